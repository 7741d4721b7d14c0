from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bdi.config import FeatureConfig, MemoryConfig, Settings


def test_defaults_match_design(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BDI_CONFIG", "BDI_CORESET_RATE", "BDI_WEIGHTS", "BDI_INPUT_SIZE"):
        monkeypatch.delenv(name, raising=False)
    model = Settings().model
    assert model.features.input_size == 448
    assert model.features.blocks == (9, 10, 11)
    assert model.memory.coreset_rate == 0.10
    assert model.scoring.score_percentile == 99.0
    assert model.scoring.blur_sigma == 1.0


def test_env_overrides_yaml_and_yaml_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("inference:\n  coreset_rate: 0.2\n  score_percentile: 95\n")
    monkeypatch.setenv("BDI_CONFIG", str(config))
    monkeypatch.setenv("BDI_CORESET_RATE", "0.05")
    settings = Settings()
    assert settings.model.memory.coreset_rate == 0.05  # env wins over YAML (docs/design.md "Environment over YAML")
    assert settings.model.scoring.score_percentile == 95  # YAML wins over defaults


def test_a_nested_model_section_of_the_yaml_sets_fields_that_have_no_env_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bdi.yaml"
    config.write_text("model:\n  memory:\n    unwrap: annulus\n    fit_rotations: 4\n    augment: flips\n"
                      "  scoring:\n    blur_sigma: 2\n    score_top_k: 5\ncalibration:\n  review_decision: ok\n"
                      "inference:\n  coreset_rate: 0.2\n")
    monkeypatch.setenv("BDI_CONFIG", str(config))
    monkeypatch.setenv("BDI_BLUR_SIGMA", "3")
    model = Settings().model
    assert (model.memory.unwrap, model.memory.fit_rotations, model.memory.augment) == ("annulus", 4, "flips")
    assert model.scoring.score_top_k == 5 and model.memory.coreset_rate == 0.2  # beside a legacy section
    assert model.scoring.blur_sigma == 3.0  # env still wins
    assert model.features.blocks == (9, 10, 11)  # what the section leaves out keeps its default
    assert Settings().calibration.review_decision == "ok"


def test_legacy_brakedisc_env_names_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAKEDISC_MODELS_DIR", "/tmp/legacy-models")
    monkeypatch.setenv("BRAKEDISC_AREA_MM2_THR", "2.5")
    settings = Settings()
    assert settings.models_dir == Path("/tmp/legacy-models")
    assert settings.model.scoring.area_mm2_thr == 2.5


def test_feature_blocks_env_is_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDI_FEATURE_BLOCKS", "8, 11")
    assert Settings().model.features.blocks == (8, 11)


def test_dataset_only_flag_parses_truthy_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDI_TRAIN_DATASET_ONLY", "1")
    assert Settings().train_dataset_only is True
    monkeypatch.setenv("BDI_TRAIN_DATASET_ONLY", "off")
    assert Settings().train_dataset_only is False


def test_server_address_keys_of_the_config_file_are_left_to_serving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BDI_BACKEND_PORT", "not-a-port")  # the server's (serving.settings), never validated here
    config = tmp_path / "app.yaml"
    config.write_text("backend_host: 0.0.0.0\nbackend_port: 9001\ncors_origins: '*'\nmin_ok_samples: 3\n")
    settings = Settings(config_file=str(config))
    assert settings.min_ok_samples == 3 and "backend_port" not in Settings.model_fields


def test_unknown_yaml_key_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("coreset_rat: 0.2\n")
    with pytest.raises(ValueError, match="coreset_rat"):
        Settings(config_file=str(config))


@pytest.mark.parametrize("kwargs", [{"input_size": 100}, {"blocks": ()}, {"depth": 4, "blocks": (9,)}])
def test_feature_config_rejects_impossible_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FeatureConfig(**kwargs)  # type: ignore[arg-type]


def test_memory_config_rejects_rate_outside_unit_interval() -> None:
    with pytest.raises(ValueError):
        MemoryConfig(coreset_rate=0.0)


def test_bad_setting_fails_at_startup_not_first_request() -> None:
    with pytest.raises(ValidationError):
        Settings(model={"features": {"input_size": 100}})


@pytest.mark.parametrize("stray", ["DEVICE", "device", "bdi_device", "Bdi_Device"])
def test_only_bdi_names_are_read_and_case_sensitively(monkeypatch: pytest.MonkeyPatch, stray: str) -> None:
    """``DEVICE=cuda BDI_DEVICE=cpu`` selects cpu; a bare or mis-cased name is never read (issue 16)."""
    monkeypatch.delenv("BRAKEDISC_DEVICE", raising=False)
    monkeypatch.setenv(stray, "cuda")
    monkeypatch.delenv("BDI_DEVICE", raising=False)
    assert Settings().model.features.device == "auto"
    monkeypatch.setenv("BDI_DEVICE", "cpu")
    assert Settings().model.features.device == "cpu"


def test_bare_mlflow_tracking_uri_is_not_a_bdi_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BDI_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BRAKEDISC_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert Settings().mlflow_tracking_uri == ""


def test_flat_yaml_keys_and_nested_init_kwargs_set_the_same_field(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("device: cpu\n")
    assert Settings(config_file=str(config)).model.features.device == "cpu"
    assert Settings(model={"features": {"device": "cpu"}}).model.features.device == "cpu"


def test_init_kwargs_speak_only_the_nested_vocabulary() -> None:
    with pytest.raises(ValidationError, match="coreset_rate"):
        Settings(coreset_rate=0.2)  # type: ignore[call-arg]


def test_env_names_merge_into_the_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDI_CORESET_RATE", "0.2")
    monkeypatch.setenv("BDI_CALIBRATION_NG_PERCENTILE", "10")
    settings = Settings(model={"features": {"input_size": 224}})
    assert settings.model.memory.coreset_rate == 0.2 and settings.model.features.input_size == 224
    assert settings.calibration.ng_percentile == 10.0


@pytest.mark.parametrize(("text", "accepted"), [("95", 95), ("95.0", 95), ("99.5", None), ("101", None)])
def test_score_percentile_is_a_whole_number_in_0_to_100(
    monkeypatch: pytest.MonkeyPatch, text: str, accepted: int | None
) -> None:
    monkeypatch.setenv("BDI_SCORE_PERCENTILE", text)
    if accepted is None:
        with pytest.raises(ValidationError, match="score_percentile"):
            Settings()
    else:
        assert Settings().model.scoring.score_percentile == accepted


def test_model_config_is_resolved_from_the_backbone_registry() -> None:
    from bdi.backbones import EFFICIENTNET_LITE0, backbone_spec
    from bdi.config import ModelConfig

    spec = backbone_spec(EFFICIENTNET_LITE0)
    model = ModelConfig(features=FeatureConfig(backbone=EFFICIENTNET_LITE0))
    assert (model.features.input_size, model.features.blocks) == (spec.input_size, spec.blocks)
    assert model.memory.projection_dim == spec.projection_dim and model.scoring.blur_sigma == spec.blur_sigma
    assert model.scoring.score_percentile == spec.score_percentile == 100  # the tuned image score: the map's max
    assert ModelConfig().scoring.score_percentile == 99  # DINOv2 keeps the contract's


def test_self_contrast_is_off_by_default_comes_from_the_env_and_must_be_a_weight_in_0_to_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BDI_BACKBONE", "efficientnet_lite2")
    assert Settings().model.scoring.self_contrast == 0.0  # the maps as the contract draws them
    monkeypatch.setenv("BDI_SELF_CONTRAST", "0.15")
    assert Settings().model.scoring.self_contrast == 0.15
    monkeypatch.setenv("BDI_SELF_CONTRAST", "1.5")
    with pytest.raises(ValidationError, match="self_contrast must be in"):
        Settings()


def test_threads_are_the_cores_divided_among_uvicorn_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in ("BDI_THREADS", "BDI_WORKERS", "BRAKEDISC_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    assert Settings().workers == 2
    assert Settings().intra_op_threads() == max(1, cores // 2)
    assert Settings(workers=cores * 4).intra_op_threads() == 1
    monkeypatch.setenv("BDI_THREADS", "3")
    assert Settings().intra_op_threads() == 3


def test_runtime_defaults_to_auto_and_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BDI_RUNTIME", raising=False)
    assert Settings().runtime == "auto"
    monkeypatch.setenv("BDI_RUNTIME", "tensorrt")
    with pytest.raises(ValidationError, match="runtime"):
        Settings()
    with pytest.raises(ValidationError, match="threads"):
        Settings(runtime="torch", threads=0)
