"""Each image's grey levels standardized before the CNN (``model.features.intensity``): a part shot darker or at
another contrast is not an anomaly, what differs inside it still is, and a memory is scored as it was fitted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bdi.backbones import DINOV2_VITS14, EFFICIENTNET_LITE0, EFFICIENTNET_LITE2
from bdi.config import FeatureConfig, Settings
from bdi.data.synthetic import make_disc
from bdi.mlops.pyfunc import recorded_feature_config
from bdi.patchcore.imaging import (
    INTENSITY_MEAN,
    INTENSITY_STD,
    MAX_INTENSITY_GAIN,
    letterbox,
    standardize_intensity,
)
from bdi.patchcore.memory import Memory, fitted_intensity
from bdi.refs import ModelRef
from bdi.service import InspectionService

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)
SIZE = 160


def _content(canvas: np.ndarray, image: np.ndarray) -> np.ndarray:
    box = letterbox(image, SIZE)[1]
    x0, y0, x1, y1 = box.content_box
    return canvas[y0:y1, x0:x1]


def test_standardizing_sets_the_content_mean_and_spread_and_leaves_the_padding_black() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(70, 25, size=(80, 160, 3)), 0, 255).astype(np.uint8)
    canvas, box = letterbox(image, SIZE)
    out = standardize_intensity(canvas, box)
    content = _content(out, image)
    assert out.dtype == np.float32
    assert content.mean() == pytest.approx(INTENSITY_MEAN, abs=0.01)
    assert content.std() == pytest.approx(INTENSITY_STD, rel=1e-3)
    assert out[: box.pad_top].max() == 0 and out[box.pad_top + box.new_h :].max() == 0


def test_standardizing_keeps_a_bright_spot_on_a_dim_part_above_255_and_caps_the_gain() -> None:
    dim = np.full((100, 100, 3), 40, np.uint8)
    dim[::2] = 60  # std 10: the gain is capped
    dim[48:52, 48:52] = 250
    canvas, box = letterbox(dim, SIZE)
    out = standardize_intensity(canvas, box)
    content = _content(out, dim)
    assert content.max() > 255  # not clipped: the spot keeps its contrast
    spread = float(canvas[box.pad_top : box.pad_top + box.new_h, box.pad_left : box.pad_left + box.new_w].std())
    assert content.std() == pytest.approx(spread * MAX_INTENSITY_GAIN, rel=1e-3)
    flat = np.full((50, 50, 3), 17, np.uint8)
    assert np.all(standardize_intensity(*letterbox(flat, SIZE))[40:120, 40:120] == INTENSITY_MEAN)


def test_standardizing_keeps_the_colour_balance() -> None:
    rng = np.random.default_rng(1)
    grey = rng.normal(90, 30, size=(64, 64, 1))
    image = np.clip(np.concatenate([grey, grey * 0.5, grey * 1.2], axis=2), 0, 255).astype(np.uint8)
    canvas, box = letterbox(image, SIZE)
    content = _content(standardize_intensity(canvas, box), image)
    raw = _content(canvas.astype(np.float32), image)
    gain = content.std() / raw.std()
    np.testing.assert_allclose(content - content.mean(), (raw - raw.mean()) * gain, atol=1e-3)  # one map for all


def test_the_cnns_standardize_by_default_and_the_vit_keeps_the_legacy_raw_input() -> None:
    assert FeatureConfig(backbone=EFFICIENTNET_LITE0).resolved().intensity == "standardize"
    assert FeatureConfig(backbone=EFFICIENTNET_LITE2).resolved().intensity == "standardize"
    assert FeatureConfig(backbone=DINOV2_VITS14).resolved().intensity == "raw"
    assert FeatureConfig(backbone=EFFICIENTNET_LITE2, intensity="raw").resolved().intensity == "raw"
    with pytest.raises(ValueError, match="intensity"):
        FeatureConfig(intensity="equalize")  # type: ignore[arg-type]


def _lite0(path: Path, intensity: str) -> InspectionService:
    return InspectionService.from_settings(Settings(
        models_dir=path / "models", weights_cache_dir=path / "cache", runtime="torch",
        model={"features": {"backbone": EFFICIENTNET_LITE0, "weights": "official", "device": "cpu",
                            "input_size": SIZE, "precision": "fp32", "intensity": intensity},
               "memory": {"coreset_rate": 0.5}},
    ))


def _discs(seed: int, n: int, defect: str | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_disc(size=SIZE, defect=defect, rng=rng).image for _ in range(n)]


def _dimmed(image: np.ndarray) -> np.ndarray:
    """The same part under weaker light: darker and flatter."""
    return np.clip(image.astype(np.float32) * 0.55 + 12, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, InspectionService]:
    services = {}
    for intensity in ("standardize", "raw"):
        service = _lite0(tmp_path_factory.mktemp(intensity), intensity)
        service.fit_images(ref=REF, mm_per_px=0.2, images=_discs(0, 8))
        services[intensity] = service
    return services


def test_a_good_part_shot_under_weaker_light_is_not_an_anomaly_once_standardized(
    fitted: dict[str, InspectionService],
) -> None:
    good = _discs(5, 3)
    dim = [_dimmed(image) for image in good]
    for intensity, service in fitted.items():
        base = [r.score for r in service.score_images(ref=REF, images=good)]
        darker = [r.score for r in service.score_images(ref=REF, images=dim)]
        ratio = float(np.mean(darker) / np.mean(base))
        if intensity == "standardize":
            assert ratio < 1.15, ratio
        else:
            assert ratio > 1.5, ratio  # what the setting fixes: raw, the weaker light alone looks like a defect


def test_a_defect_still_stands_out_after_standardizing(fitted: dict[str, InspectionService]) -> None:
    service = fitted["standardize"]
    good = [r.score for r in service.score_images(ref=REF, images=_discs(5, 3))]
    defects = [r.score for r in service.score_images(ref=REF, images=_discs(6, 3, defect="pit"))]
    assert min(defects) > max(good)


def test_a_memory_is_scored_with_the_intensity_it_was_fitted_with_whatever_the_server_says(
    tmp_path: Path, fitted: dict[str, InspectionService],
) -> None:
    raw_fitted = fitted["raw"]
    memory = raw_fitted.store.load_memory(REF)
    assert memory is not None and fitted_intensity(memory.metadata) == "raw"
    images = _discs(5, 2)
    expected = [r.score for r in raw_fitted.score_images(ref=REF, images=images)]
    # a server whose setting is standardize, serving the raw memory (as after an upgrade)
    upgraded = InspectionService.from_settings(Settings(
        models_dir=raw_fitted.settings.models_dir, weights_cache_dir=tmp_path / "cache", runtime="torch",
        model={"features": {"backbone": EFFICIENTNET_LITE0, "weights": "official", "device": "cpu",
                            "input_size": SIZE, "precision": "fp32", "intensity": "standardize"}},
    ))
    assert [r.score for r in upgraded.score_images(ref=REF, images=images)] == pytest.approx(expected, rel=1e-5)


def test_a_memory_fitted_before_the_setting_existed_is_scored_raw_and_rebuilt_raw(tmp_path: Path) -> None:
    legacy = Memory(embeddings=np.zeros((1, 4), np.float32), token_shape=(1, 1),
                    metadata={"features": {"backbone": EFFICIENTNET_LITE2, "input_size": 320, "blocks": [2, 4]}})
    assert fitted_intensity(legacy.metadata) == "raw"
    assert recorded_feature_config(legacy.metadata, model_dir=tmp_path, overrides={}).intensity == "raw"
    standardized = {**legacy.metadata["features"], "intensity": "standardize"}
    rebuilt = recorded_feature_config({"features": standardized}, model_dir=tmp_path, overrides={})
    assert rebuilt.intensity == "standardize"
