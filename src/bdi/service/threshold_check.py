"""Whether a new calibration can still detect anything (docs/design.md "Calibrations that detect nothing are
flagged"): a threshold above every NG score it knows (the request's NG scores, or the stored NG samples scored
by the model when it was given none) accepts every NG sample. The calibration is stored all the same (the
contract's rule chose it); the check warns in the response, in ``/health`` (``bdi.storage.alerts``) and in the
diagnostics log (``calibration.detection_disabled``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bdi.errors import BDIError
from bdi.logging import slog
from bdi.patchcore.calibration import Calibration
from bdi.refs import ModelRef
from bdi.service.context import ServiceContext
from bdi.service.scoring import score_samples
from bdi.storage.alerts import record_alert
from bdi.storage.fsio import utc_now_iso


@dataclass(frozen=True)
class DetectionCheck:
    """The NG scores a threshold was compared with: how many, the highest (None: not known one by one), where
    they came from (``request`` or ``stored_samples``), and the warnings (empty when detection works)."""

    n_ng: int
    max_ng_score: float | None
    source: str
    warnings: tuple[str, ...]


def check_detection(ctx: ServiceContext, ref: ModelRef, calib: Calibration) -> DetectionCheck:
    """Compare ``calib.threshold`` with the NG scores it was computed from, else with the stored NG samples."""
    if calib.n_ng:
        if calib.escape_rate is not None and calib.escape_rate >= 1.0:
            return DetectionCheck(n_ng=calib.n_ng, max_ng_score=None, source="request", warnings=(
                f"threshold {calib.threshold:g} is above every one of the {calib.n_ng} NG scores it was calibrated "
                "with: no NG sample would be detected",))
        return DetectionCheck(n_ng=calib.n_ng, max_ng_score=None, source="request", warnings=())
    scores = _stored_ng_scores(ctx, ref, calib)
    if not scores or max(scores) >= calib.threshold:
        return DetectionCheck(n_ng=len(scores), max_ng_score=max(scores, default=None), source="stored_samples",
                              warnings=())
    return DetectionCheck(n_ng=len(scores), max_ng_score=max(scores), source="stored_samples", warnings=(
        f"threshold {calib.threshold:g} is above the score of every stored NG sample ({len(scores)}, highest "
        f"{max(scores):g}): no NG sample would be detected",))


def _stored_ng_scores(ctx: ServiceContext, ref: ModelRef, calib: Calibration) -> list[float]:
    """The scores of the stored NG samples at the calibration's percentile and area; [] when there are none, no
    memory, more than ``BDI_MAX_DATASET_IMAGES`` or they cannot be scored (logged)."""
    if not ctx.datasets.counts(ref.dataset_ref())["ng"] or ctx.memory_or_none(ref) is None:
        return []
    try:
        samples = ctx.capped_samples(ref, ["ng"])["ng"]
        scoring = replace(ctx.settings.model.scoring, score_percentile=calib.score_percentile,
                          area_mm2_thr=calib.area_mm2_thr)
        model = ctx.model(ref, endpoint="calibration_check", calibrated=False, scoring=scoring)
        items = score_samples(ctx, model, label="ng", samples=samples, default_mm_per_px=calib.mm_per_px,
                              include_heatmap=False, progress=None)
    except BDIError as exc:
        slog("calibration.detection_check_skipped", model_key=ref.model_key, error=str(exc))
        return []
    return [item.score for item in items if item.score is not None]


def record_detection(ctx: ServiceContext, ref: ModelRef, calib: Calibration, check: DetectionCheck) -> None:
    """Log the check and keep ``/health``'s alert of this model in step with it (set, or cleared)."""
    key = f"{ref.recipe_id}/{ref.model_key_fs}/{ref.base}"
    alert: dict[str, Any] | None = None
    if check.warnings:
        alert = {"recipe_id": ref.recipe_id, "role_id": ref.role_id, "roi_id": ref.roi_id,
                 "model_key": ref.model_key, "threshold": calib.threshold, "n_ng": check.n_ng,
                 "max_ng_score": check.max_ng_score, "ng_source": check.source, "warnings": list(check.warnings),
                 "at_utc": utc_now_iso()}
        slog("calibration.detection_disabled", **{k: v for k, v in alert.items() if k != "at_utc"})
    record_alert(ctx.store.root, key=key, alert=alert)
