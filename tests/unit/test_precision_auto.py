"""``BDI_PRECISION=auto`` (issue 29): bf16 on a CPU that computes it natively where the parity check passes, fp32
otherwise; the CPU flags and the parity tolerance are given as parameters, torch is never mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdi.patchcore.features import FeatureExtractor, cpu_flags, native_bf16_flags, resolve_precision
from bdi.runtime.parity import ParityTolerance
from bdi.runtime.select import attach_runtime
from bdi.service import InspectionService
from tests.helpers.tiny import tiny_feature_config, tiny_settings

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
SKYLAKE = frozenset({"fpu", "avx2", "avx512f"})


def test_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert native_bf16_flags(cpu_flags(info)) == ("avx512_bf16",)


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16() -> None:
    assert resolve_precision("auto", CPU, cpu_flags_seen=SAPPHIRE_RAPIDS)[0] == "bf16"
    assert resolve_precision("auto", CPU, cpu_flags_seen=SKYLAKE)[0] == "fp32"
    assert resolve_precision("auto", torch.device("cuda"), cpu_flags_seen=SKYLAKE)[0] == "fp16"
    assert resolve_precision("fp32", CPU, cpu_flags_seen=SAPPHIRE_RAPIDS)[0] == "fp32"  # an explicit choice stays
    assert "avx512_bf16" in resolve_precision("auto", CPU, cpu_flags_seen=SAPPHIRE_RAPIDS)[1]


@pytest.fixture(scope="module")
def auto_on_bf16_cpu(tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    cache = tmp_path_factory.mktemp("weights")
    return FeatureExtractor(tiny_feature_config(precision="auto"), cache_dir=cache, cpu_flags_seen=SAPPHIRE_RAPIDS)


def test_auto_runs_bf16_where_the_cpu_has_it_and_parity_passes(auto_on_bf16_cpu: FeatureExtractor,
                                                                tmp_path: Path) -> None:
    extractor = auto_on_bf16_cpu
    assert extractor.precision == "bf16"
    status = attach_runtime(extractor, requested="torch", root=tmp_path / "exports", threads=1)
    health = status.health()
    assert (health["runtime_precision"], health["runtime_fallback"]) == ("bf16", None)
    assert health["runtime_parity"]["torch-bf16"]["passed"] is True
    service = InspectionService(settings=tiny_settings(tmp_path / "models"), extractor=extractor, runtime=status)
    assert service.health()["runtime_precision_choice"].startswith("auto: bf16, this CPU computes bf16 natively")


def test_auto_falls_back_to_fp32_when_bf16_fails_parity(auto_on_bf16_cpu: FeatureExtractor, tmp_path: Path) -> None:
    extractor = auto_on_bf16_cpu
    status = attach_runtime(extractor, requested="torch", root=tmp_path / "exports", threads=1,
                            tolerance=ParityTolerance(feature_rel=0.0, score_rel=0.0))  # bf16 rounding fails it
    health = status.health()
    assert health["runtime_precision"] == "fp32" and health["runtime_fallback"] is not None
    assert health["runtime_parity"]["torch-bf16"]["passed"] is False
    service = InspectionService(settings=tiny_settings(tmp_path / "models"), extractor=extractor, runtime=status)
    assert "bf16 not used" in service.health()["runtime_precision_choice"]
    assert "fp32 runs" in service.health()["runtime_precision_choice"]


def test_auto_stays_fp32_on_a_cpu_without_native_bf16(tmp_path: Path) -> None:
    extractor = FeatureExtractor(tiny_feature_config(precision="auto"), cache_dir=tmp_path, cpu_flags_seen=SKYLAKE)
    assert extractor.precision == "fp32"
    assert extractor.precision_reason == "auto: fp32, this CPU has no native bf16"
