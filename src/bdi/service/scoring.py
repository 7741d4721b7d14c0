"""Scoring stored samples one label at a time: what ``/infer_dataset`` reports and ``/calibrate_dataset``
calibrates on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bdi.errors import BDIError, InvalidInputError
from bdi.patchcore.imaging import build_roi_mask, encode_png_gray, parse_shape, validate_mm_per_px
from bdi.patchcore.model import PatchCoreModel, ProgressFn
from bdi.service.context import ServiceContext
from bdi.service.results import SampleScore
from bdi.storage.datasets import Sample


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
    """Score every stored sample of one label; a sample that fails gets ``error`` set, the rest go on.

    Samples are validated first (scale, image, shape), then the valid ones are extracted in batches.
    """
    threshold = model.threshold
    items: list[SampleScore | None] = [None] * len(samples)
    valid: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (position, crop, mask, mm_per_px)
    for i, sample in enumerate(samples):
        mm = sample.meta.get("mm_per_px", default_mm_per_px)
        try:
            if mm is None:
                raise InvalidInputError("no mm_per_px in the sample meta and no default_mm_per_px")
            mm = validate_mm_per_px(mm)
            crop = ctx.decode(sample.path.read_bytes(), name=sample.path.name)
            mask = build_roi_mask(parse_shape(sample.meta.get("shape_json")),
                                  width=crop.shape[1], height=crop.shape[0])
            valid.append((i, crop, mask, mm))
        except (BDIError, OSError) as exc:
            items[i] = SampleScore(
                label=label, filename=sample.path.name, mm_per_px=mm if isinstance(mm, float) else None,
                score=None, regions=[], error=str(exc), threshold=threshold,
            )
    results = model.score([v[1] for v in valid], [v[2] for v in valid], mm_per_px=[v[3] for v in valid],
                          progress=progress, progress_stage=f"score_{label}")
    for (i, _, _, mm), result in zip(valid, results, strict=True):
        items[i] = SampleScore(
            label=label, filename=samples[i].path.name, mm_per_px=mm, score=result.score,
            regions=result.regions, error=None,
            heatmap_png=encode_png_gray(result.heatmap_u8()) if include_heatmap else None,
            threshold=threshold,
        )
    return [item for item in items if item is not None]
