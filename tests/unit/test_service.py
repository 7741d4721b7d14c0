"""The use cases end to end on the real (shrunk, random-init) ViT and real FAISS."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest

from bdi.data.synthetic import DiscGeometry, make_disc
from bdi.errors import (
    CalibrationMissingError,
    ImageDecodeError,
    InsufficientSamplesError,
    InvalidInputError,
    NotFittedError,
    ScaleMismatchError,
)
from bdi.patchcore.imaging import build_roi_mask
from bdi.refs import ModelRef
from bdi.service import InspectionService
from tests.helpers.synthetic import png_bytes

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _fit_and_calibrate(service: InspectionService, good: list[np.ndarray], bad: list[np.ndarray]) -> float:
    service.fit_images(ref=REF, mm_per_px=0.2, images=good[:10])
    held_out = service.score_images(ref=REF, images=good[10:] + bad)
    ok = [r.score for r in held_out[: len(good) - 10]]
    ng = [r.score for r in held_out[len(good) - 10 :]]
    return service.calibrate_from_scores(ref=REF, ok_scores=ok, ng_scores=ng).threshold


def test_defective_disc_scores_above_every_good_disc(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:10])
    scores = [r.score for r in service.score_images(ref=REF, images=good_discs[10:] + defect_discs)]
    good_scores, defect_scores = scores[:2], scores[2:]
    assert min(defect_scores) > max(good_scores)


def test_fit_reports_contract_counts(service: InspectionService, good_discs: list[np.ndarray]) -> None:
    result = service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:3])
    tokens = 8 * 8  # 112 px input / 14 px patches
    assert result.token_shape == (8, 8)
    assert result.n_embeddings == 3 * tokens
    assert result.coreset_size == int(np.ceil(3 * tokens * 0.1))
    assert result.coreset_rate_applied == pytest.approx(result.coreset_size / (3 * tokens))
    assert result.memory_path.is_file() and result.index_path is not None and result.index_path.is_file()


def test_fit_times_the_forward_apart_from_the_rest_of_the_encoding(
    service: InspectionService, good_discs: list[np.ndarray]
) -> None:
    timings = service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2]).timings_ms
    assert {"encode", "letterbox", "normalise", "forward", "coreset", "index", "save"} <= set(timings)
    assert 0 < timings["forward"] <= timings["encode"]


def test_memory_fit_keeps_every_patch(service: InspectionService, good_discs: list[np.ndarray]) -> None:
    result = service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2], memory_fit=True)
    assert result.coreset_size == result.n_embeddings
    assert result.coreset_rate_requested == 1.0


def test_infer_flags_defect_with_annulus_mask_and_regions(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    threshold = _fit_and_calibrate(service, good_discs, defect_discs[:2])
    shape = DiscGeometry(96).annulus_shape()
    good = service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(good_discs[11]), shape=shape)
    bad = service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(defect_discs[0]), shape=shape)
    assert good.decision == "ok" and good.heatmap_png is None
    assert bad.decision == "ng" and bad.heatmap_png is not None
    assert bad.result.score > threshold > good.result.score
    assert bad.result.token_shape == (8, 8)


def test_infer_without_memory_is_not_fitted(service: InspectionService, good_discs: list[np.ndarray]) -> None:
    with pytest.raises(NotFittedError, match="Memoria no encontrada"):
        service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(good_discs[0]))


def test_infer_without_calibration_is_calibration_missing(
    service: InspectionService, good_discs: list[np.ndarray]
) -> None:
    service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2])
    with pytest.raises(CalibrationMissingError, match="calibration_missing"):
        service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(good_discs[0]))


def test_infer_reports_calibration_missing_after_refit(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    _fit_and_calibrate(service, good_discs, defect_discs)
    service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[2:8])  # a different memory
    with pytest.raises(CalibrationMissingError, match="stale"):
        service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(good_discs[0]))


def test_infer_rejects_mm_per_px_other_than_the_recipe_lock(
    service: InspectionService, good_discs: list[np.ndarray]
) -> None:
    service.store.lock_mm_per_px(REF.recipe_id, 0.2)  # as a successful fit or infer does
    with pytest.raises(ScaleMismatchError, match="mm_per_px mismatch"):
        service.infer(ref=REF, mm_per_px=0.25, image=png_bytes(good_discs[0]))


def test_infer_rejects_undecodable_image_before_model_lookup(service: InspectionService) -> None:
    with pytest.raises(ImageDecodeError, match="No se pudo decodificar"):
        service.infer(ref=REF, mm_per_px=0.2, image=b"hello")


def test_fit_from_dataset_needs_min_ok_samples(service: InspectionService, good_discs: list[np.ndarray]) -> None:
    dataset = REF.dataset_ref()
    service.samples.upload(ref=dataset, label="ok", files=[(f"{i}.png", png_bytes(d)) for i, d in
                                                          enumerate(good_discs[:9])])
    with pytest.raises(InsufficientSamplesError, match="Insufficient OK samples: need at least 10, found 9"):
        service.fit_ok(ref=REF, mm_per_px=0.2, use_dataset=True)


def test_upload_is_all_or_nothing_when_one_file_is_not_an_image(
    service: InspectionService, good_discs: list[np.ndarray]
) -> None:
    dataset = REF.dataset_ref()
    with pytest.raises(ImageDecodeError):
        service.samples.upload(ref=dataset, label="ok", files=[("a.png", png_bytes(good_discs[0])),
                                                               ("b.png", b"not an image")])
    assert service.datasets.samples(dataset, "ok") == []


def test_upload_rejects_metas_length_mismatch(service: InspectionService, good_discs: list[np.ndarray]) -> None:
    with pytest.raises(InvalidInputError, match="metas length must match images length"):
        service.samples.upload(ref=REF.dataset_ref(), label="ok",
                               files=[("a.png", png_bytes(good_discs[0]))] * 2, metas=["{}"])


def test_calibrate_dataset_scores_stored_samples(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    dataset = REF.dataset_ref()
    service.samples.upload(ref=dataset, label="ok", files=[(None, png_bytes(d)) for d in good_discs[:10]])
    service.samples.upload(ref=dataset, label="ng", files=[(None, png_bytes(d)) for d in defect_discs])
    service.fit_ok(ref=REF, mm_per_px=0.2, use_dataset=True)
    calib = service.calibrate_dataset(ref=REF, default_mm_per_px=0.2)
    assert (calib.n_ok, calib.n_ng) == (10, 3)
    assert calib.threshold > 0
    items = service.infer_dataset(ref=REF, default_mm_per_px=0.2)
    assert len(items) == 13 and all(i.error is None for i in items)


def test_golden_scores_for_seeded_discs_and_weights(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    """Pins the whole chain (letterbox, ViT, coreset, 1-NN, un-letterbox, blur, percentile) for a fixed
    seed: a change here changes every calibrated threshold in the field, so it must be deliberate."""
    service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:10])
    mask = build_roi_mask(DiscGeometry(96).annulus_shape(), width=96, height=96)
    good, bad = service.score_images(ref=REF, images=[good_discs[10], defect_discs[0]], masks=[mask, mask])
    assert good.score == pytest.approx(0.517271, abs=1e-4)
    assert bad.score == pytest.approx(0.765237, abs=1e-4)


def _lazy_discs(n: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(3)
    for _ in range(n):
        yield make_disc(size=96, rng=rng).image


def _traced_peak_of_fit(service: InspectionService, n: int) -> int:
    tracemalloc.start()
    try:
        service.fit_images(ref=REF, mm_per_px=0.2, images=_lazy_discs(n), n_images=n)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fit_memory_grows_with_the_bank_not_with_all_embeddings(service: InspectionService) -> None:
    """A fit decodes and encodes in batches: per extra image its peak grows by far less than one float32
    copy of the image's patch rows (the old fit held three). numpy's allocations are what is traced."""
    service.fit_images(ref=REF, mm_per_px=0.2, images=_lazy_discs(2), n_images=2)  # warm-up
    small, large = _traced_peak_of_fit(service, 8), _traced_peak_of_fit(service, 40)
    rows_per_image = service.extractor.num_tokens * service.extractor.embed_dim * 4
    growth_per_image = (large - small) / 32
    assert growth_per_image < 0.75 * rows_per_image, (growth_per_image, rows_per_image)
