"""Scoring stored samples one label at a time: what ``/infer_dataset`` reports and ``/calibrate_dataset``
calibrates on, streamed so that a request holds a bounded batch of decoded images, never all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bdi.errors import BDIError, InvalidInputError
from bdi.monitoring.imagestats import image_stats
from bdi.patchcore.imaging import build_roi_mask, encode_png_gray, parse_shape, validate_mm_per_px
from bdi.patchcore.model import PatchCoreModel, ProgressFn
from bdi.patchcore.polar import PolarView
from bdi.service.context import ServiceContext
from bdi.service.results import SampleScore
from bdi.storage.datasets import Sample


@dataclass(frozen=True)
class _Decoded:
    """One valid sample of the batch being scored: its position in the request, crop, ROI mask and scale."""

    position: int
    crop: np.ndarray  # BGR uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W)
    mm_per_px: float
    view: PolarView | None  # how the model sees it (PatchCoreModel.view)


def score_samples(
    ctx: ServiceContext,
    model: PatchCoreModel,
    *,
    label: str,
    samples: Sequence[Sample],
    default_mm_per_px: float | None,
    include_heatmap: bool,
    progress: ProgressFn | None,
) -> list[SampleScore]:
    """Score every stored sample of one label, in order; a sample that fails gets ``error`` set, the rest go on.

    Streamed: each sample is validated and decoded (scale, image within ``BDI_MAX_IMAGE_PIXELS``, shape) into a
    batch that is scored and released as soon as it holds the extractor's ``batch_size`` samples or
    ``BDI_MAX_IMAGE_PIXELS`` decoded pixels. So a request holds less than two images at the pixel limit
    (plus one crop's maps while it is scored), whatever the number of samples.
    ``progress(f"score_{label}", done, len(samples))`` after each batch.
    """
    slots: list[SampleScore | None] = [None] * len(samples)
    batch: list[_Decoded] = []
    batch_pixels = 0
    max_batch = ctx.settings.model.features.batch_size
    max_pixels = ctx.limits.max_image_pixels
    for i, sample in enumerate(samples):
        decoded = _decode_sample(ctx, sample, position=i, label=label, default_mm_per_px=default_mm_per_px,
                                 model=model)
        if isinstance(decoded, SampleScore):
            slots[i] = decoded
            continue
        batch.append(decoded)
        batch_pixels += decoded.crop.shape[0] * decoded.crop.shape[1]
        del decoded  # the batch alone holds the crop: it is released with the batch
        if len(batch) >= max_batch or batch_pixels >= max_pixels:
            _score_batch(model, batch, slots=slots, samples=samples, label=label, include_heatmap=include_heatmap)
            batch, batch_pixels = [], 0
            if progress:
                progress(f"score_{label}", i + 1, len(samples))
    if batch:
        _score_batch(model, batch, slots=slots, samples=samples, label=label, include_heatmap=include_heatmap)
    if progress:
        progress(f"score_{label}", len(samples), len(samples))
    return [item for item in slots if item is not None]


def _decode_sample(
    ctx: ServiceContext,
    sample: Sample,
    *,
    position: int,
    label: str,
    default_mm_per_px: float | None,
    model: PatchCoreModel,
) -> _Decoded | SampleScore:
    """The sample ready to score, or its error item (bad scale, image or shape; unreadable file)."""
    mm = sample.meta.get("mm_per_px", default_mm_per_px)
    try:
        if mm is None:
            raise InvalidInputError("no mm_per_px in the sample meta and no default_mm_per_px")
        mm = validate_mm_per_px(mm)
        crop = ctx.decode(sample.path.read_bytes(), name=sample.path.name)
        shape = parse_shape(sample.meta.get("shape_json"))
        mask = build_roi_mask(shape, width=crop.shape[1], height=crop.shape[0])
        view = model.view(shape, width=crop.shape[1], height=crop.shape[0])
    except (BDIError, OSError) as exc:
        return SampleScore(
            label=label, filename=sample.path.name, mm_per_px=mm if isinstance(mm, float) else None,
            score=None, regions=[], error=str(exc), threshold=model.threshold, **_judged(model, None),
        )
    return _Decoded(position=position, crop=crop, mask=mask, mm_per_px=mm, view=view)


def _score_batch(
    model: PatchCoreModel,
    batch: Sequence[_Decoded],
    *,
    slots: list[SampleScore | None],
    samples: Sequence[Sample],
    label: str,
    include_heatmap: bool,
) -> None:
    """Score one batch into ``slots`` (each result is reduced to its item, heatmap PNG included, at once)."""
    results = model.score([d.crop for d in batch], [d.mask for d in batch], mm_per_px=[d.mm_per_px for d in batch],
                          views=[d.view for d in batch])
    for decoded, result in zip(batch, results, strict=True):
        slots[decoded.position] = SampleScore(
            label=label, filename=samples[decoded.position].path.name, mm_per_px=decoded.mm_per_px,
            score=result.score, regions=result.regions, error=None,
            heatmap_png=encode_png_gray(result.heatmap_u8()) if include_heatmap else None,
            threshold=model.threshold, image_stats=image_stats(decoded.crop).to_dict(), **_judged(model, result.score),
        )


def _judged(model: PatchCoreModel, score: float | None) -> dict[str, Any]:
    """An item's ``review`` and band thresholds, by /infer's rule (:meth:`Calibration.judge`; the decision it also
    gives is no item field). An item without a score is never review but keeps the band, as it keeps ``threshold``;
    an uncalibrated model (what calibration scores with) has neither."""
    calib = model.calibration
    if calib is None:
        return {}
    if score is None:
        band = calib.band
        return {} if band is None else {"threshold_low": band.threshold_low, "threshold_high": band.threshold_high}
    verdict = calib.judge(score)
    return {"review": verdict.review, "threshold_low": verdict.threshold_low, "threshold_high": verdict.threshold_high}
