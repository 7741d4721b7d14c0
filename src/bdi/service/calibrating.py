"""Calibrating (docs/contract.md "POST /calibrate_ng", "POST /calibrate_dataset", "POST /calibrate_manual"): a
threshold from scores, or one an operator chose, stored with the memory it belongs to."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from bdi.errors import CalibrationMissingError, InsufficientSamplesError, InvalidInputError, NotFittedError
from bdi.monitoring.imagestats import STAT_NAMES, image_stats
from bdi.patchcore.calibration import (
    SCORE_SERIES,
    Band,
    Calibration,
    ThresholdChoice,
    choose_band,
    choose_threshold,
    finite_scores,
    reference_series,
    resolved_percentile,
)
from bdi.patchcore.model import ProgressFn
from bdi.refs import ModelRef
from bdi.service.context import ServiceContext
from bdi.service.results import ManualCalibration
from bdi.service.scoring import score_samples
from bdi.storage.datasets import LABELS
from bdi.storage.fsio import utc_now_iso
from bdi.storage.lineage import ensure_api_writable

# stored with the calibration only, never validated nor locked (docs/contract.md "POST /calibrate_ng")
CALIBRATE_NG_DEFAULT_MM_PER_PX = 0.2

CalibrateHook = Callable[[ModelRef, Calibration], None]
MANUAL_SOURCE = "manual"  # Calibration.source of a threshold an operator set


class Calibrating:
    """Choose and store a model's threshold, from client scores or from its stored samples."""

    def __init__(self, ctx: ServiceContext, *, on_calibrate: CalibrateHook | None = None) -> None:
        self._ctx = ctx
        self._on_calibrate = on_calibrate

    def from_scores(
        self,
        *,
        ref: ModelRef,
        ok_scores: Iterable[Any],
        ng_scores: Iterable[Any] | None,
        mm_per_px: float | None = None,
        score_percentile: float | None = None,
        area_mm2_thr: float | None = None,
        ok_images: Sequence[np.ndarray] | None = None,
        band: bool = False,
    ) -> Calibration:
        """/calibrate_ng: threshold from client scores; returns the stored calibration. ``ok_images`` (the decoded
        OK crops the scores came from: the pipeline's calibrate stage) add their statistics to the drift reference.
        ``band``: also set the OK / review / NG band from the NG scores when there are some and ``calibration.band``
        is on (the pipeline's calibrate stage; the legacy ``/calibrate_ng`` keeps the single threshold)."""
        ctx = self._ctx
        ensure_api_writable(ctx.store, ref)
        percentile, area = self._percentile_and_area(score_percentile, area_mm2_thr)
        ok, ng = list(ok_scores), list(ng_scores or [])  # read twice: the threshold rule, then the drift reference
        choice = choose_threshold(ok, ng, score_percentile=percentile, cfg=ctx.settings.calibration)
        memory = ctx.memory_or_none(ref)
        calib = Calibration.from_choice(
            choice, area_mm2_thr=area, memory_fingerprint=memory.fingerprint if memory is not None else None,
            created_at_utc=utc_now_iso(), statistics=True,
            mm_per_px=float(CALIBRATE_NG_DEFAULT_MM_PER_PX if mm_per_px is None else mm_per_px),
            band=self._band(choice, ok, ng) if band else None,
        )
        reference = {SCORE_SERIES: reference_series(finite_scores(ok, name="ok_scores"))}
        if ok_images:
            stats = [image_stats(image) for image in ok_images]
            reference.update({name: reference_series(getattr(s, name) for s in stats) for name in STAT_NAMES})
        calib = replace(calib, reference=reference)
        self._save(ref, calib)
        return calib

    def from_dataset(
        self,
        *,
        ref: ModelRef,
        score_percentile: float | None = None,
        area_mm2_thr: float | None = None,
        default_mm_per_px: float | None = None,
        require_ng: bool = True,
        progress: ProgressFn | None = None,
    ) -> Calibration:
        """/calibrate_dataset: score the stored OK/NG samples and write a new calibration."""
        ctx = self._ctx
        ensure_api_writable(ctx.store, ref)
        percentile, area = self._percentile_and_area(score_percentile, area_mm2_thr)
        model = ctx.model(ref, endpoint="/calibrate_dataset", calibrated=False,
                          scoring=replace(ctx.settings.model.scoring, score_percentile=percentile, area_mm2_thr=area))
        scores: dict[str, list[float]] = {"ok": [], "ng": []}
        ok_stats: dict[str, list[float]] = {name: [] for name in STAT_NAMES}  # the drift reference's
        tracker = ctx.progress.tracker(ref, "calibrate", forward=progress)  # what GET /progress reads
        try:
            for label, samples in ctx.capped_samples(ref, LABELS).items():
                for item in score_samples(ctx, model, label=label, samples=samples,
                                          default_mm_per_px=default_mm_per_px, include_heatmap=False,
                                          progress=tracker):
                    if item.score is not None:
                        scores[label].append(item.score)
                        if label == "ok" and item.image_stats is not None:
                            for name in STAT_NAMES:
                                ok_stats[name].append(item.image_stats[name])
        except BaseException as exc:
            tracker.finish(error=exc)
            raise
        tracker.finish()
        if not scores["ok"]:
            raise InsufficientSamplesError("No valid OK samples for calibration.")
        if require_ng and not scores["ng"]:
            raise InsufficientSamplesError("No NG samples available for calibration.")
        choice = choose_threshold(scores["ok"], scores["ng"], score_percentile=percentile,
                                  cfg=ctx.settings.calibration)
        calib = Calibration.from_choice(
            choice, area_mm2_thr=area, memory_fingerprint=model.memory.fingerprint, created_at_utc=utc_now_iso(),
            ids=ref, band=self._band(choice, scores["ok"], scores["ng"]),
        )
        reference = {SCORE_SERIES: reference_series(scores["ok"]),
                     **{name: reference_series(values) for name, values in ok_stats.items() if values}}
        calib = replace(calib, reference=reference)
        self._save(ref, calib)
        return calib

    def manual(self, *, ref: ModelRef, threshold: float) -> ManualCalibration:
        """/calibrate_manual: store ``threshold`` as the model's calibration with ``source="manual"``, bound to
        the fitted memory; the percentile and area are the current calibration's (else the settings').

        Raises:
            InvalidInputError: the threshold is not a finite number > 0.
            NotFittedError: no memory to bind the threshold to.
        """
        ctx = self._ctx
        if not math.isfinite(threshold) or threshold <= 0:
            raise InvalidInputError(f"threshold must be a finite number > 0, got {threshold!r}")
        ensure_api_writable(ctx.store, ref)
        memory = ctx.memory_or_none(ref)
        if memory is None:
            raise NotFittedError("/calibrate_manual")
        try:
            previous = ctx.store.calibrations.load(ref, defaults=ctx.settings.model.scoring)
        except CalibrationMissingError:  # an empty or threshold-less file: nothing to restore
            previous = None
        percentile, area = (
            (previous.score_percentile, previous.area_mm2_thr) if previous is not None
            else self._percentile_and_area(None, None))
        calib = Calibration(
            threshold=float(threshold), score_percentile=percentile, area_mm2_thr=area,
            memory_fingerprint=memory.fingerprint, created_at_utc=utc_now_iso(), ids=ref, source=MANUAL_SOURCE,
            # the OK samples the previous calibration saw stay the drift reference while the memory is the same
            reference=previous.reference if previous is not None
            and previous.memory_fingerprint == memory.fingerprint else None,
        )
        self._save(ref, calib)
        return ManualCalibration(calibration=calib,
                                 previous_threshold=previous.threshold if previous is not None else None)

    def _percentile_and_area(self, score_percentile: float | None, area_mm2_thr: float | None) -> tuple[int, float]:
        """The calibration's ``score_percentile`` (stored as an int) and ``area_mm2_thr``; None = settings."""
        scoring = self._ctx.settings.model.scoring
        percentile = int(resolved_percentile(scoring) if score_percentile is None else score_percentile)
        area = float(scoring.area_mm2_thr if area_mm2_thr is None else area_mm2_thr)
        return percentile, area

    def _band(self, choice: ThresholdChoice, ok: list[Any], ng: list[Any]) -> Band | None:
        """The band of the settings' budgets when ``calibration.band`` is on and NG scores were given, else None."""
        cfg = self._ctx.settings.calibration
        return choose_band(ok, ng, threshold=choice.threshold, cfg=cfg) if cfg.band else None

    def _save(self, ref: ModelRef, calib: Calibration) -> None:
        self._ctx.store.calibrations.save(ref, calib)
        if self._on_calibrate is not None:
            self._on_calibrate(ref, calib)
