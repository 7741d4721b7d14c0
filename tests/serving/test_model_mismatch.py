"""A memory fitted with one backbone (or other layers, or other weights) is never scored by another:
``/infer`` answers a clear 409 instead of a meaningless score."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bdi.backbones import EFFICIENTNET_LITE0
from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.service import InspectionService
from serving.app import create_app
from tests.helpers.synthetic import disc_png
from tests.helpers.tiny import tiny_settings
from tests.serving.conftest import MM, ROI, ROLE

REF = ModelRef.create(recipe_id="default", role_id=ROLE, roi_id=ROI, model_key=None)


def _fit_and_calibrate(service: InspectionService, images: list[bytes]) -> None:
    service.fit_ok(ref=REF, mm_per_px=MM, images=[(f"{i}.png", data) for i, data in enumerate(images)])
    service.calibrate_from_scores(ref=REF, ok_scores=[0.1, 0.2], ng_scores=[0.9], mm_per_px=MM)


def _infer(models_dir: Path, extractor: FeatureExtractor, image: bytes,
           features: dict[str, object] | None = None) -> dict[str, object]:
    settings = tiny_settings(models_dir, features=features, log_dir=models_dir.parent / "logs")
    with TestClient(create_app(service=InspectionService(settings=settings, extractor=extractor))) as client:
        response = client.post("/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                               files={"image": ("x.png", image, "image/png")})
    return {"status": response.status_code, **response.json()}


@pytest.fixture()
def fitted_with_tiny_vit(tmp_path: Path, tiny_extractor: FeatureExtractor) -> Path:
    models_dir = tmp_path / "models"
    service = InspectionService(settings=tiny_settings(models_dir), extractor=tiny_extractor)
    _fit_and_calibrate(service, [disc_png(seed=i) for i in range(4)])
    return models_dir


def test_infer_rejects_memory_from_another_backbone(fitted_with_tiny_vit: Path, tmp_path: Path) -> None:
    features = {"backbone": EFFICIENTNET_LITE0, "weights": "official", "input_size": 64, "blocks": None,
                "depth": None}
    settings = tiny_settings(fitted_with_tiny_vit, features=features)
    cnn = FeatureExtractor(settings.model.features, cache_dir=tmp_path / "cache")
    body = _infer(fitted_with_tiny_vit, cnn, disc_png(seed=9), features=features)
    assert body["status"] == 409
    assert "vit_small_patch14_dinov2" in str(body["error"]) and EFFICIENTNET_LITE0 in str(body["error"])


def test_infer_rejects_memory_fitted_with_other_layers(fitted_with_tiny_vit: Path, tmp_path: Path) -> None:
    other_blocks = tiny_settings(fitted_with_tiny_vit, features={"blocks": (0, 2, 3)})
    extractor = FeatureExtractor(other_blocks.model.features, cache_dir=tmp_path / "cache")
    body = _infer(fitted_with_tiny_vit, extractor, disc_png(seed=9), features={"blocks": (0, 2, 3)})
    assert body["status"] == 409
    assert "blocks [1, 2, 3] vs [0, 2, 3]" in str(body["error"])


def test_infer_rejects_memory_fitted_with_other_weights(fitted_with_tiny_vit: Path, tmp_path: Path) -> None:
    reseeded = tiny_settings(fitted_with_tiny_vit, features={"seed": 7})
    extractor = FeatureExtractor(reseeded.model.features, cache_dir=tmp_path / "cache")
    body = _infer(fitted_with_tiny_vit, extractor, disc_png(seed=9), features={"seed": 7})
    assert body["status"] == 409 and "weights" in str(body["error"])


def test_infer_on_a_matching_memory_still_scores(fitted_with_tiny_vit: Path, tiny_extractor: FeatureExtractor) -> None:
    body = _infer(fitted_with_tiny_vit, tiny_extractor, disc_png(seed=9))
    assert body["status"] == 200 and body["decision"] in {"ok", "ng"}
