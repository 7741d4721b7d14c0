"""A fit's augmentation and image-score rule, end to end on the tiny model: stored with the memory, used by every
scorer of it, and an old memory without them scores as before."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bdi.config import ScoringConfig
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.imaging import letterbox_geometry
from bdi.patchcore.inference import top_k_score
from bdi.patchcore.memory import Memory, fitted_scoring
from bdi.refs import ModelRef
from bdi.service import InspectionService
from tests.helpers.tiny import tiny_settings

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _service(path: Path, extractor: FeatureExtractor, **model: object) -> InspectionService:
    settings = tiny_settings(path / "models")
    settings = settings.model_copy(update={"model": replace(
        settings.model,
        memory=replace(settings.model.memory, **{k: v for k, v in model.items() if k in ("augment", "fit_rotations")}),
        scoring=replace(settings.model.scoring, **{k: v for k, v in model.items() if k == "score_top_k"}),
    )})
    return InspectionService(settings=settings, extractor=extractor)


def test_flips_fit_four_copies_of_each_good_image_and_store_the_mode(
    tmp_path: Path, tiny_extractor: FeatureExtractor, good_discs: list[np.ndarray]
) -> None:
    plain = _service(tmp_path / "plain", tiny_extractor).fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2])
    service = _service(tmp_path / "flips", tiny_extractor, augment="flips")
    flipped = service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2])
    assert flipped.n_embeddings == 4 * plain.n_embeddings
    assert flipped.coreset_size > plain.coreset_size
    memory = service.store.load_memory(REF)
    assert memory is not None and memory.metadata["memory"]["augment"] == "flips"
    again = _service(tmp_path / "again", tiny_extractor, augment="flips").fit_images(
        ref=REF, mm_per_px=0.2, images=good_discs[:2])
    assert again.fingerprint == flipped.fingerprint  # the same images give the same memory


def test_flips_apply_to_each_of_fit_rotations_copies(
    tmp_path: Path, tiny_extractor: FeatureExtractor, good_discs: list[np.ndarray]
) -> None:
    plain = _service(tmp_path / "plain", tiny_extractor).fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:1])
    both = _service(tmp_path / "both", tiny_extractor, augment="flips", fit_rotations=3).fit_images(
        ref=REF, mm_per_px=0.2, images=good_discs[:1])
    assert both.n_embeddings == 3 * 4 * plain.n_embeddings and both.n_images == 1


def test_the_fit_top_k_scores_the_memory_whatever_the_scorer_settings(
    tmp_path: Path, tiny_extractor: FeatureExtractor, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    _service(tmp_path, tiny_extractor, score_top_k=3).fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:4])
    server = _service(tmp_path, tiny_extractor)  # another process, today's default (0) in its settings
    [result] = server.score_images(ref=REF, images=defect_discs[:1])
    image = defect_discs[0]
    letterbox = letterbox_geometry(src_w=image.shape[1], src_h=image.shape[0], size=112)
    assert result.score == pytest.approx(top_k_score(
        result.anomaly_map, result.mask, k=3, grid=result.token_shape, letterbox=letterbox, remove_letterbox=True))
    assert result.score < float(result.anomaly_map.max())  # the mean of 3 patch scores, below the map maximum


def test_a_memory_fitted_without_a_stored_top_k_scores_with_the_percentile_rule() -> None:
    old = Memory(embeddings=np.zeros((1, 2), np.float32), token_shape=(1, 1), metadata={"n_images": 1})
    settings = ScoringConfig(score_percentile=100, blur_sigma=4.0, score_top_k=5)
    assert fitted_scoring(old, settings).score_top_k == 0
    new = replace(old, metadata={"scoring": {"score_top_k": 7}})
    assert fitted_scoring(new, settings) == replace(settings, score_top_k=7)
