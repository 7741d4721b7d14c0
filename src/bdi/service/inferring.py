"""Inferring (docs/contract.md "POST /infer", "POST /infer_dataset"): score crops with a stored model and
decide ok/ng with its calibrated threshold."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from bdi.config import ScoringConfig
from bdi.logging import slog
from bdi.monitoring.record import InspectionLog
from bdi.patchcore.imaging import build_roi_mask, encode_png_gray, parse_shape, validate_mm_per_px
from bdi.patchcore.inference import InferenceResult, StageTimer
from bdi.patchcore.model import ProgressFn
from bdi.refs import ModelRef
from bdi.service.context import ServiceContext
from bdi.service.recording import record_inference
from bdi.service.results import InferOutcome, SampleScore
from bdi.service.scoring import score_samples
from bdi.storage import model_lock
from bdi.storage.datasets import LABELS, parse_label
from bdi.storage.lineage import lineage_view, read_lineage

InferHook = Callable[..., None]


class Inferring:
    """Score one crop, a model's stored samples, or decoded crops without a threshold."""

    def __init__(self, ctx: ServiceContext, *, on_infer: InferHook | None = None,
                 record: InspectionLog | None = None) -> None:
        self._ctx = ctx
        self._record = record  # this process's inspection record writer (None: recording is off)
        # called after each successful infer as on_infer(ref, image=, shape=, mm_per_px=, outcome=) (shadow mode)
        self.on_infer = on_infer

    def infer(
        self,
        *,
        ref: ModelRef,
        mm_per_px: float,
        image: bytes,
        shape: str | Mapping[str, Any] | None = None,
        include_heatmap: bool | None = None,
    ) -> InferOutcome:
        """/infer: score one crop and decide ok/ng with the calibrated threshold, record the decision (bdi.monitoring),
        then call ``on_infer``."""
        ctx = self._ctx
        timer = StageTimer()
        mm_per_px = validate_mm_per_px(mm_per_px)
        ctx.store.check_mm_per_px(ref.recipe_id, mm_per_px)  # 409 here; locked once the request succeeded
        with timer.stage("decode"):
            crop = ctx.decode(image, name="image")
        with model_lock.reading(ctx.store, ref):  # memory, index, calibration and lineage of one version
            model = ctx.model(ref, endpoint="/infer", require_index=True)
            lineage = read_lineage(ctx.store, ref)
        assert model.calibration is not None  # calibrated=True
        threshold = model.calibration.threshold
        roi_shape = parse_shape(shape)
        with timer.stage("mask"):
            mask = build_roi_mask(roi_shape, width=crop.shape[1], height=crop.shape[0])
            view = model.view(roi_shape, width=crop.shape[1], height=crop.shape[0])
        (result,) = model.score([crop], [mask], mm_per_px=[mm_per_px], views=[view], timer=timer)
        verdict = model.calibration.judge(result.score, review_decision=ctx.settings.calibration.review_decision)
        decision = verdict.decision
        want_heatmap = include_heatmap if include_heatmap is not None else decision == "ng"
        heatmap_png = None
        if want_heatmap:
            with timer.stage("png"):
                heatmap_png = encode_png_gray(result.heatmap_u8())
        result = replace(result, timings_ms=dict(timer.timings_ms))
        ctx.store.lock_mm_per_px(ref.recipe_id, mm_per_px)  # docs/design.md "Failed requests leave nothing behind"
        slog("infer.response", score=result.score, threshold=threshold, decision=decision, review=verdict.review,
             timings_ms=result.timings_ms, model_key=ref.model_key)
        outcome = InferOutcome(result=result, threshold=threshold, decision=decision, heatmap_png=heatmap_png,
                               lineage=lineage_view(memory=model.memory, calib=model.calibration, lineage=lineage),
                               review=verdict.review, threshold_low=verdict.threshold_low,
                               threshold_high=verdict.threshold_high)
        if self._record is not None:
            record_inference(self._record, ref=ref, image=image, crop=crop, mm_per_px=mm_per_px, outcome=outcome,
                             shape=shape)
        if self.on_infer is not None:
            self.on_infer(ref, image=image, shape=shape, mm_per_px=mm_per_px, outcome=outcome)
        return outcome

    def infer_dataset(
        self,
        *,
        ref: ModelRef,
        labels: Sequence[str] = LABELS,
        include_heatmap: bool = False,
        default_mm_per_px: float | None = None,
        progress: ProgressFn | None = None,
    ) -> list[SampleScore]:
        """/infer_dataset: score every stored sample of the given labels."""
        ctx = self._ctx
        clean_labels = [parse_label(label) for label in labels]
        with model_lock.reading(ctx.store, ref):
            model = ctx.model(ref, endpoint="/infer_dataset")
        items: list[SampleScore] = []
        for label, samples in ctx.capped_samples(ref, clean_labels).items():
            items.extend(score_samples(ctx, model, label=label, samples=samples, default_mm_per_px=default_mm_per_px,
                                       include_heatmap=include_heatmap, progress=progress))
        return items

    def score_images(
        self,
        *,
        ref: ModelRef,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
        scoring: ScoringConfig | None = None,
        progress: ProgressFn | None = None,
        shapes: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[InferenceResult]:
        """Score decoded crops (batched extraction) with no threshold: for calibration/evaluation.
        ``scoring`` defaults to the settings'; ``masks[i]`` None means the whole crop; ``shapes[i]`` is crop i's
        ROI shape, which a model fitted on unwrapped annuli needs (``PatchCoreModel.view``)."""
        model = self._ctx.model(ref, endpoint="score_images", calibrated=False, scoring=scoring)
        given = shapes if shapes is not None else [None] * len(images)
        views = [model.view(shape, width=image.shape[1], height=image.shape[0])
                 for image, shape in zip(images, given, strict=True)]
        return list(model.score(images, masks, views=views, progress=progress))
