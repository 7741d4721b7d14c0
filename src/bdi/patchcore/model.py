"""A fitted PatchCore model: feature extractor + memory (and its kNN index) + the calibration that applies.

:meth:`PatchCoreModel.score` is the one scoring loop
(batched extraction, then 1-NN, map, score and regions per crop). The service, the MLflow pyfunc and the
evaluate stage all score through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bdi.config import ScoringConfig
from bdi.errors import InvalidInputError, NotFittedError
from bdi.patchcore.calibration import Calibration, usable_calibration
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.imaging import Letterbox, build_roi_mask
from bdi.patchcore.inference import InferenceResult, Region, StageTimer, find_regions, score_crop
from bdi.patchcore.knn import KnnIndex
from bdi.patchcore.memory import Memory, fitted_intensity, fitted_map_offset
from bdi.patchcore.polar import MIN_INNER_RATIO, VIEW_POLAR, PolarView, polar_view

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class PatchCoreModel:
    """One fitted model ready to score.

    ``scoring`` is the calibration's percentile and area when ``calibration`` is set (then regions are
    found at its threshold); without a calibration scores come alone (what calibration itself needs).
    """

    extractor: FeatureExtractor
    memory: Memory
    index: KnnIndex
    scoring: ScoringConfig
    calibration: Calibration | None = None

    @property
    def threshold(self) -> float | None:
        return self.calibration.threshold if self.calibration is not None else None

    def calibrated(self, calib: Calibration | None) -> PatchCoreModel:
        """This model with the stored calibration ``calib``; CalibrationMissingError when it does not
        apply to this memory (none, no usable threshold, stale or unbound)."""
        calibration = usable_calibration(calib, memory_fingerprint=self.memory.fingerprint)
        return replace(self, calibration=calibration, scoring=calibration.scoring(self.scoring))

    @property
    def unwrapped(self) -> bool:
        """Fitted on annuli unwrapped into strips (``bdi.patchcore.polar``): it scores crops the same way."""
        return self.memory.metadata.get("view") == VIEW_POLAR

    def view(self, shape: Mapping[str, Any] | None, *, width: int, height: int) -> PolarView | None:
        """How this model sees a ``width``×``height`` crop with ROI ``shape``: None (the crop itself) unless it was
        fitted on unwrapped annuli; then the shape must be an annulus that unwraps (InvalidInputError otherwise)."""
        if not self.unwrapped:
            return None
        view = polar_view(shape, width=width, height=height)
        if view is None:
            raise InvalidInputError(
                "this model was fitted on annulus ROIs unwrapped into strips (memory.unwrap=annulus): send the "
                f"ROI's annulus shape (kind annulus, r_inner >= {MIN_INNER_RATIO:g} r) with the crop")
        return view

    def decide(self, score: float, *, review_decision: str = "ng") -> str:
        """``"ng"`` at or above the calibrated threshold, else ``"ok"``; with a band, its lane (a score sent to
        review is decided ``review_decision``, fail-safe ``"ng"``)."""
        if self.calibration is None:
            raise NotFittedError(detail="an uncalibrated model cannot decide")
        return self.calibration.judge(score, review_decision=review_decision).decision

    def score(
        self,
        crops: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
        *,
        mm_per_px: Sequence[float] | None = None,
        views: Sequence[PolarView | None] | None = None,
        progress: ProgressFn | None = None,
        progress_stage: str = "score",
        timer: StageTimer | None = None,
    ) -> Iterator[InferenceResult]:
        """Score BGR crops ``(H, W, 3)`` uint8, lazily, in order.

        ``masks[i]`` is crop i's ``(H, W)`` uint8 ROI mask (None: the whole crop); ``mm_per_px[i]`` its
        scale for region areas (default 1.0); ``views[i]`` its :meth:`view` (needed by an unwrapped model: the
        strip is scored and its map warped back onto the crop, where the regions are found).
        ``progress(progress_stage, done, total)`` after each batch.
        """
        timer = timer or StageTimer()
        given = masks if masks is not None else [None] * len(crops)
        scales = mm_per_px if mm_per_px is not None else [1.0] * len(crops)
        seen = views if views is not None else [None] * len(crops)
        if self.unwrapped and any(view is None for view in seen):
            raise InvalidInputError("an unwrapped model scores crops through their polar views (PatchCoreModel.view)")
        inputs = (crop if view is None else view.unwrap(crop) for crop, view in zip(crops, seen, strict=True))
        # as the memory was fitted: intensity, letterbox, normalise, forward
        intensity = fitted_intensity(self.memory.metadata)
        batches = self.extractor.iter_extract(inputs, clock=timer.stage, intensity=intensity)
        done = 0
        for batch in batches:
            for j in range(len(batch)):
                k = done + j
                mask = given[k]
                if mask is None:
                    mask = build_roi_mask(None, width=crops[k].shape[1], height=crops[k].shape[0])
                embedded = (batch.embeddings[j], batch.grid, batch.letterboxes[j])
                view = seen[k]
                if view is None:
                    yield self._score(*embedded, mask=mask, threshold=self.threshold, mm_per_px=scales[k],
                                      timer=timer)
                else:
                    yield self._score_unwrapped(*embedded, view=view, mask=mask, mm_per_px=scales[k], timer=timer)
            done += len(batch)
            if progress:
                progress(progress_stage, done, len(crops))

    def _score(self, embeddings: np.ndarray, grid: tuple[int, int], letterbox: Letterbox, *, mask: np.ndarray,
               threshold: float | None, mm_per_px: float, timer: StageTimer) -> InferenceResult:
        """Score one input's patch embeddings (a crop, or a crop's strip) against the memory."""
        return score_crop(
            embeddings=embeddings, grid=grid, letterbox=letterbox, index=self.index,
            memory_grid=self.memory.token_shape, mask=mask, cfg=self.scoring, threshold=threshold,
            mm_per_px=mm_per_px, timer=timer, normalize=self.memory.l2_normalized,
            offset=fitted_map_offset(self.memory),
        )

    def _score_unwrapped(self, embeddings: np.ndarray, grid: tuple[int, int], letterbox: Letterbox, *,
                         view: PolarView, mask: np.ndarray, mm_per_px: float, timer: StageTimer) -> InferenceResult:
        """Score the strip inside the crop's ROI unwrapped, then warp its map back onto the crop and find the
        regions there (areas in crop px, so in mm²)."""
        with timer.stage("unwrap"):
            strip_mask = view.unwrap(mask)
        strip = self._score(embeddings, grid, letterbox, mask=strip_mask, threshold=None, mm_per_px=mm_per_px,
                            timer=timer)
        with timer.stage("unwrap"):
            anomaly_map = view.wrap_back(strip.anomaly_map)
        regions: list[Region] = []
        if self.threshold is not None:
            with timer.stage("regions"):
                regions = find_regions(anomaly_map, mask, threshold=self.threshold, mm_per_px=mm_per_px,
                                       area_mm2_thr=self.scoring.area_mm2_thr)
        return InferenceResult(score=strip.score, token_shape=strip.token_shape, anomaly_map=anomaly_map, mask=mask,
                               regions=regions, timings_ms=dict(timer.timings_ms))
