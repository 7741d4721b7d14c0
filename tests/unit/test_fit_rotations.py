"""``MemoryConfig.fit_rotations``: rotated copies of each training image enter the memory, so a round part seen
at another angle is not new to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bdi.backbones import EFFICIENTNET_LITE0
from bdi.config import MemoryConfig, Settings
from bdi.data.disc_scenes import make_hard_disc
from bdi.patchcore.augment import rotated_copies
from bdi.refs import ModelRef
from bdi.service import InspectionService

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _service(tmp_path: Path, *, fit_rotations: int) -> InspectionService:
    settings = Settings(
        models_dir=tmp_path / f"models-{fit_rotations}", weights_cache_dir=tmp_path / "cache", runtime="torch",
        model={"features": {"backbone": EFFICIENTNET_LITE0, "weights": "official", "device": "cpu",
                            "input_size": 128},
               "memory": {"fit_rotations": fit_rotations, "coreset_rate": 1.0}},
    )
    return InspectionService.from_settings(settings)


def test_rotated_copies_turn_the_image_about_its_centre() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    copies = rotated_copies(image, 4)
    assert len(copies) == 4 and all(c.shape == image.shape and c.dtype == image.dtype for c in copies)
    assert np.array_equal(copies[0], image)
    for k in (1, 2, 3):  # quarter turns, counter-clockwise as displayed
        assert np.abs(copies[k].astype(int) - np.rot90(image, k).astype(int)).max() <= 1, k


def test_fit_rotations_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="fit_rotations"):
        MemoryConfig(fit_rotations=0)


def test_a_disc_turned_a_quarter_scores_lower_when_the_memory_saw_it_rotated(tmp_path: Path) -> None:
    disc = make_hard_disc(size=128, rng=np.random.default_rng(4)).image
    turned = np.ascontiguousarray(np.rot90(disc))
    scores = {}
    for n in (1, 4):
        service = _service(tmp_path, fit_rotations=n)
        fit = service.fit_images(ref=REF, mm_per_px=0.2, images=[disc])
        rows, cols = fit.token_shape
        assert fit.n_images == 1 and fit.n_embeddings == n * rows * cols
        (result,) = service.score_images(ref=REF, images=[turned])
        scores[n] = result.score
    assert scores[4] < 0.5 * scores[1], scores
