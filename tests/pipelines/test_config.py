"""conf/ + pipelines.config: overrides compose, typos fail clearly, keys map 1:1 to bdi's dataclasses."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from pydantic import TypeAdapter

from bdi.backbones import PRETRAINED_CNN
from bdi.config import CalibrationConfig, FeatureConfig, ModelConfig
from bdi.mlops.tracking import TrackingConfig
from pipelines.config import (
    PipelineConfigError,
    compose_config,
    model_config,
    schema_twin,
    to_plain,
    to_settings,
    validate,
)
from pipelines.hints import override_hint

PROJECT = Path(__file__).resolve().parents[2]


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_override_coreset_rate_composes() -> None:
    cfg = validate(to_plain(compose_config(["model.memory.coreset_rate=0.05"])))
    assert cfg.model.memory.coreset_rate == pytest.approx(0.05)
    assert model_config(cfg).memory.coreset_rate == pytest.approx(0.05)


def test_group_override_selects_tiny_model() -> None:
    cfg = validate(to_plain(compose_config(["model=tiny"])))
    features = model_config(cfg).features
    assert (features.weights, features.input_size, features.depth, features.blocks) == ("random", 112, 4, (1, 2, 3))


def test_misspelt_key_is_a_composition_error() -> None:
    with pytest.raises(ConfigCompositionException, match="coreset_rat"):
        compose_config(["model.memory.coreset_rat=0.1"])


def test_misspelt_or_pre_nesting_key_hint_suggests_the_real_key() -> None:
    hint = override_hint(["model.coreset_rate=0.1", "dataset=synthetic", "model.memory.coreset_rate=0.2"])
    assert "Unknown config key 'model.coreset_rate'" in hint
    assert "'model.memory.coreset_rate'" in hint
    assert hint.count("Unknown") == 1


def test_wrong_type_is_a_composition_error() -> None:
    with pytest.raises(ConfigCompositionException, match="coreset_rate"):
        compose_config(["model.memory.coreset_rate=lots"])


def test_unknown_key_in_params_is_rejected() -> None:
    data = to_plain(compose_config())
    data["model"]["memory"]["coreset_rat"] = 0.1
    with pytest.raises(PipelineConfigError, match="coreset_rat"):
        validate(data, source="params.yaml")


def test_invalid_value_names_the_key() -> None:
    data = to_plain(compose_config(["model.memory.coreset_rate=1.5"]))
    with pytest.raises(PipelineConfigError, match="coreset_rate"):
        model_config(validate(data))


@pytest.mark.parametrize("cls", [ModelConfig, CalibrationConfig, TrackingConfig])
def test_pipeline_sections_are_the_library_dataclasses(cls: type) -> None:
    twin = schema_twin(cls)
    assert _names(twin) == _names(cls)
    assert TypeAdapter(cls).validate_python(dataclasses.asdict(twin())) == cls()  # the same defaults


def test_schema_defaults_equal_bdi_defaults() -> None:
    cfg = validate(to_plain(compose_config()))
    schema_default = validate({"dataset": {"name": "x", "source": "x"}})
    assert model_config(schema_default) == ModelConfig()
    assert model_config(cfg) == ModelConfig(features=FeatureConfig(backbone=PRETRAINED_CNN))
    assert model_config(cfg).scoring.score_percentile == 100  # the registry's tuned image score
    assert cfg.calibration.ng_percentile == CalibrationConfig().ng_percentile


def test_settings_reproduce_the_model_config(tmp_path: Path) -> None:
    cfg = validate(to_plain(compose_config(["model=tiny", "model.memory.coreset_rate=0.05"])))
    settings = to_settings(cfg, models_dir=tmp_path)
    assert settings.model == model_config(cfg)
    assert settings.models_dir == tmp_path


def test_every_model_and_rule_key_reaches_the_service_settings(tmp_path: Path) -> None:
    overrides = ["model=tiny", "model.scoring.remove_letterbox=false", "model.features.seed=7", "model.memory.seed=8",
                 "calibration.ng_percentile=10", "calibration.overlap_factor=1.1"]
    settings = to_settings(validate(to_plain(compose_config(overrides))), models_dir=tmp_path)
    model = settings.model
    assert model.scoring.remove_letterbox is False
    assert (model.features.seed, model.memory.seed) == (7, 8)
    rule = settings.calibration
    assert (rule.ng_percentile, rule.overlap_factor) == (10.0, 1.1)


def test_fractional_score_percentile_is_refused() -> None:
    with pytest.raises(ConfigCompositionException, match="score_percentile"):
        compose_config(["model.scoring.score_percentile=99.5"])


def test_hydra_writes_no_output_folders() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.run.dir == "."
    assert cfg.hydra.output_subdir is None
    assert "file" not in cfg.hydra.job_logging.handlers


def test_cli_typo_exits_non_zero_with_hint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.fit_ok", "model.memory.coreset_rat=0.1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "Could not override 'model.memory.coreset_rat'" in out.stderr
    assert "Did you mean 'model.memory.coreset_rate'" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_the_disc_model_group_sets_the_disc_rois_measured_settings() -> None:
    cfg = validate(to_plain(compose_config(["model=efficientnet_lite2_discs"])))
    model = model_config(cfg)
    assert model.features.backbone == "efficientnet_lite2" and model.features.input_size == 448
    assert model.features.intensity == "raw"  # measured so: standardized, the vents lost 0.05 on seed 7
    assert model.memory.fit_rotations == 4 and model.memory.unwrap == "annulus"
    assert model.scoring.blur_sigma == pytest.approx(2.0)
