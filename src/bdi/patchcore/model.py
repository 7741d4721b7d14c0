"""A fitted PatchCore model: feature extractor + memory (and its kNN index) + the calibration that applies.

:meth:`PatchCoreModel.score` is the one scoring loop
(batched extraction, then 1-NN, map, score and regions per crop). The service, the MLflow pyfunc and the
evaluate stage all score through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from bdi.config import ScoringConfig
from bdi.errors import NotFittedError
from bdi.patchcore.calibration import Calibration, usable_calibration
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.imaging import build_roi_mask
from bdi.patchcore.inference import InferenceResult, StageTimer, score_crop
from bdi.patchcore.knn import KnnIndex
from bdi.patchcore.memory import Memory

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
        progress: ProgressFn | None = None,
        progress_stage: str = "score",
        timer: StageTimer | None = None,
    ) -> Iterator[InferenceResult]:
        """Score BGR crops ``(H, W, 3)`` uint8, lazily, in order.

        ``masks[i]`` is crop i's ``(H, W)`` uint8 ROI mask (None: the whole crop); ``mm_per_px[i]`` its
        scale for region areas (default 1.0). ``progress(progress_stage, done, total)`` after each batch.
        """
        timer = timer or StageTimer()
        given = masks if masks is not None else [None] * len(crops)
        scales = mm_per_px if mm_per_px is not None else [1.0] * len(crops)
        batches = self.extractor.iter_extract(crops, clock=timer.stage)  # letterbox, normalise, forward
        done = 0
        for batch in batches:
            for j in range(len(batch)):
                k = done + j
                mask = given[k]
                if mask is None:
                    mask = build_roi_mask(None, width=crops[k].shape[1], height=crops[k].shape[0])
                yield score_crop(
                    embeddings=batch.embeddings[j], grid=batch.grid, letterbox=batch.letterboxes[j],
                    index=self.index, memory_grid=self.memory.token_shape, mask=mask, cfg=self.scoring,
                    threshold=self.threshold, mm_per_px=scales[k], timer=timer,
                    normalize=self.memory.l2_normalized,
                )
            done += len(batch)
            if progress:
                progress(progress_stage, done, len(crops))
