"""``memory.unwrap = "annulus"``: a model fitted on narrow annulus ROIs unwrapped into strips records it, scores every
crop through its annulus the same way, and reports its map and regions on the crop."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from bdi.backbones import EFFICIENTNET_LITE0
from bdi.config import Settings
from bdi.data.disc_scenes import RoiCrop, make_hard_disc
from bdi.errors import InvalidInputError
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.imaging import build_roi_mask
from bdi.refs import ModelRef
from bdi.service import InspectionService
from tests.helpers.tiny import tiny_settings

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="ring", model_key=None)


def _tiny(path: Path, extractor: FeatureExtractor, unwrap: str) -> InspectionService:
    settings = tiny_settings(path)
    memory = replace(settings.model.memory, unwrap=unwrap)
    settings = settings.model_copy(update={"model": replace(settings.model, memory=memory)})
    return InspectionService(settings=settings, extractor=extractor)


def _ring_crops(n: int, seed: int = 0, roi: str = "ring") -> list[RoiCrop]:
    rng = np.random.default_rng(seed)
    return [make_hard_disc(size=128, rng=rng).roi_crop(roi) for _ in range(n)]


def _view(service: InspectionService) -> str:
    memory = service.store.load_memory(REF)
    assert memory is not None
    return str(memory.metadata["view"])


def test_a_fit_on_narrow_annuli_unwraps_them_only_when_asked_and_records_what_it_saw(
    tmp_path: Path, tiny_extractor: FeatureExtractor
) -> None:
    crops = _ring_crops(2)
    images, shapes = [c.image for c in crops], [c.shape for c in crops]
    unwrapping = _tiny(tmp_path / "polar", tiny_extractor, "annulus")
    unwrapping.fit_images(ref=REF, mm_per_px=0.2, images=images, shapes=shapes)
    assert _view(unwrapping) == "polar"
    memory = unwrapping.store.load_memory(REF)
    assert memory is not None and memory.metadata["memory"]["unwrap"] == "annulus"
    unwrapping.fit_images(ref=REF, mm_per_px=0.2, images=images)  # uploads carry no shape: crops
    assert _view(unwrapping) == "crop"
    hubs = _ring_crops(2, roi="hub")  # a small bore: a crop
    unwrapping.fit_images(ref=REF, mm_per_px=0.2, images=[c.image for c in hubs], shapes=[c.shape for c in hubs])
    assert _view(unwrapping) == "crop"
    plain = _tiny(tmp_path / "plain", tiny_extractor, "none")
    plain.fit_images(ref=REF, mm_per_px=0.2, images=images, shapes=shapes)
    assert _view(plain) == "crop"


def test_a_fit_mixing_narrow_annuli_and_other_rois_is_refused(
    tmp_path: Path, tiny_extractor: FeatureExtractor
) -> None:
    crops = _ring_crops(2)
    service = _tiny(tmp_path, tiny_extractor, "annulus")
    with pytest.raises(InvalidInputError, match="sample 2 is a crop"):
        service.fit_images(ref=REF, mm_per_px=0.2, images=[c.image for c in crops], shapes=[crops[0].shape, None])
    assert service.store.load_memory(REF) is None  # nothing stored


def test_an_unwrapped_model_refuses_a_crop_without_its_annulus_and_maps_onto_the_crop_with_one(
    tmp_path: Path, tiny_extractor: FeatureExtractor
) -> None:
    crops = _ring_crops(3)
    service = _tiny(tmp_path, tiny_extractor, "annulus")
    service.fit_images(ref=REF, mm_per_px=0.2, images=[c.image for c in crops[:2]],
                       shapes=[c.shape for c in crops[:2]])
    crop = crops[2]
    with pytest.raises(InvalidInputError, match="send the ROI's annulus shape"):
        service.score_images(ref=REF, images=[crop.image])
    with pytest.raises(InvalidInputError, match="send the ROI's annulus shape"):
        service.score_images(ref=REF, images=[crop.image], shapes=[{"kind": "circle"}])
    mask = build_roi_mask(crop.shape, width=crop.image.shape[1], height=crop.image.shape[0])
    (result,) = service.score_images(ref=REF, images=[crop.image], masks=[mask], shapes=[crop.shape])
    assert result.anomaly_map.shape == crop.image.shape[:2] and np.array_equal(result.mask, mask)
    assert result.score > 0 and np.isfinite(result.anomaly_map).all()


def test_an_unwrapped_model_finds_a_spot_on_the_ring_where_it_is_on_the_crop(tmp_path: Path) -> None:
    settings = Settings(
        models_dir=tmp_path / "models", weights_cache_dir=tmp_path / "cache", runtime="torch",
        model={"features": {"backbone": EFFICIENTNET_LITE0, "weights": "official", "device": "cpu",
                            "input_size": 128, "precision": "fp32"},
               "memory": {"unwrap": "annulus", "coreset_rate": 1.0}},
    )
    service = InspectionService.from_settings(settings)
    good = _ring_crops(4)
    service.fit_images(ref=REF, mm_per_px=0.2, images=[c.image for c in good], shapes=[c.shape for c in good])
    (test,) = _ring_crops(1, seed=1)
    shape = test.shape
    middle = (float(shape["r"]) + float(shape["r_inner"])) / 2
    for angle in (0.3, 1.5, 2.8, 4.4):  # spots all round the ring: the map comes back at each one's angle
        x, y = float(shape["cx"]) + middle * np.cos(angle), float(shape["cy"]) + middle * np.sin(angle)
        image = test.image.copy()
        cv2.circle(image, (round(x), round(y)), 4, (255, 255, 255), thickness=-1)
        (result,) = service.score_images(ref=REF, images=[image], shapes=[shape])
        inside = np.where(result.mask > 0, result.anomaly_map, -np.inf)
        peak_y, peak_x = np.unravel_index(int(np.argmax(inside)), inside.shape)
        assert np.hypot(peak_x - x, peak_y - y) < 14, (angle, peak_x, peak_y, x, y)
