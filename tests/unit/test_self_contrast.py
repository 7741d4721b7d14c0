"""The self-contrast end to end on the tiny model: a server with BDI_SELF_CONTRAST set scores a memory fitted without
it, with the same score and a sharper map (bdi.patchcore.inference.sharpen_by_self_contrast)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.service import InspectionService
from tests.helpers.tiny import tiny_settings

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)
SIZE = 112


def _texture(seed: int, *, rough_quarter: bool = False) -> np.ndarray:
    """A seeded grey texture; with ``rough_quarter`` its top-left quarter is ground rougher (like an `uneven` tile)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 25, size=(SIZE, SIZE)).astype(np.float32)
    if rough_quarter:
        noise[: SIZE // 2, : SIZE // 2] *= 2.0
    grey = cv2.GaussianBlur(128 + noise, (0, 0), 1.0)
    return np.dstack([np.clip(grey, 0, 255).astype(np.uint8)] * 3)


def _service(path: Path, extractor: FeatureExtractor, self_contrast: float) -> InspectionService:
    settings = tiny_settings(path / "models")
    scoring = replace(settings.model.scoring, self_contrast=self_contrast)
    settings = settings.model_copy(update={"model": replace(settings.model, scoring=scoring)})
    return InspectionService(settings=settings, extractor=extractor)


def test_a_server_with_self_contrast_keeps_the_score_and_turns_down_the_rest_of_the_part(
    tmp_path: Path, tiny_extractor: FeatureExtractor
) -> None:
    plain = _service(tmp_path, tiny_extractor, 0.0)
    plain.fit_images(ref=REF, mm_per_px=0.2, images=[_texture(seed) for seed in range(6)])
    sharpened = _service(tmp_path, tiny_extractor, 0.15)  # another process, the same memory on disk
    percentile = sharpened.settings.model.scoring.score_percentile
    part = _texture(100, rough_quarter=True)
    [before] = plain.score_images(ref=REF, images=[part])
    [after] = sharpened.score_images(ref=REF, images=[part])
    assert after.score == pytest.approx(before.score, rel=1e-6)  # the calibration stays valid
    assert np.percentile(after.anomaly_map, percentile) == pytest.approx(before.score, rel=1e-4)
    rough = np.zeros(part.shape[:2], bool)
    rough[: SIZE // 2 - 8, : SIZE // 2 - 8] = True  # the rough quarter, clear of the blurred border
    rest = np.zeros_like(rough)
    rest[SIZE // 2 + 8 :, SIZE // 2 + 8 :] = True  # the opposite quarter, as ground as the good parts

    def contrast(anomaly_map: np.ndarray) -> float:
        return float(np.median(anomaly_map[rough]) / np.median(anomaly_map[rest]))

    assert contrast(before.anomaly_map) > 1.0  # the memory alone sees the rough quarter
    assert contrast(after.anomaly_map) > 1.2 * contrast(before.anomaly_map)  # the sharpened map sees it more
    assert np.median(after.anomaly_map[rest]) < np.median(before.anomaly_map[rest])  # the rest turned down
    assert "contrast" in after.timings_ms and "contrast" not in before.timings_ms
