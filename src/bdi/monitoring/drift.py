"""Drift per ROI (docs/monitoring.md "Drift"): the live window of a model's recorded inspections against the reference
its calibration stored (the OK samples' scores and image statistics).

For each series (``score``, ``brightness``, ``contrast``, ``sharpness``) the two-sample Kolmogorov-Smirnov test
(:func:`scipy.stats.ks_2samp`), the population stability index over the reference's deciles and, where the
reference holds at least :data:`WASSERSTEIN_MIN_REFERENCE` values, the Wasserstein distance
(:func:`scipy.stats.wasserstein_distance`, in the series' own unit). A series warns when its PSI reaches 0.1 *and*
the KS test rejects at 0.1 %, and is in alarm at PSI 0.25 and KS 0.01 %: PSI alone is noisy on a window of a few
dozen, and KS alone flags differences too small to matter on a large one; the small p-values keep the chance that
one of the five tests of a ROI warns on an unchanged stream well under 1 % per evaluation. The live NG rate is
tested against the calibrated false-reject rate (one-sided :func:`scipy.stats.binomtest`: warn at p < 0.1 %, alarm
at p < 0.01 %).

The cause names the series that moved: ``lighting`` (brightness or contrast) or ``focus`` (sharpness), whichever
mean moved most as a log ratio, the sharpness counted beyond what the contrast change explains (a gain change
scales the Laplacian's variance with the contrast squared); or ``score`` when only the scores or the NG rate moved
(the parts themselves, or the model).
A model without a stored reference (calibrated before references existed) is ``no_reference``; one with fewer
than the minimum live records ``insufficient_data``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import binomtest, ks_2samp, wasserstein_distance

from bdi.monitoring.imagestats import STAT_NAMES
from bdi.monitoring.record import InspectionRecord

SCORE = "score"
SERIES: tuple[str, ...] = (SCORE, *STAT_NAMES)
OK, WARN, ALARM = "ok", "warn", "alarm"
NO_REFERENCE, INSUFFICIENT = "no_reference", "insufficient_data"
STATUS_LEVEL = {OK: 0, WARN: 1, ALARM: 2}  # the gauge values of bdi_drift_status
PSI_WARN, PSI_ALARM = 0.1, 0.25
KS_P_WARN, KS_P_ALARM = 1e-3, 1e-4
NG_P_WARN, NG_P_ALARM = 1e-3, 1e-4
PSI_BINS = 10
PSI_EPSILON = 1e-4  # the share given to an empty bin, so the log stays finite
WASSERSTEIN_MIN_REFERENCE = 50
CAUSE_LIGHTING, CAUSE_FOCUS, CAUSE_SCORE = "lighting", "focus", "score"
IMAGE_CAUSES = {"brightness": CAUSE_LIGHTING, "contrast": CAUSE_LIGHTING, "sharpness": CAUSE_FOCUS}


@dataclass(frozen=True)
class SeriesDrift:
    """One series of one ROI: reference and live sizes and means, KS statistic and p-value, PSI, Wasserstein."""

    name: str
    status: str
    n_reference: int
    n_live: int
    reference_mean: float
    live_mean: float
    effect: float  # (live mean - reference mean) / reference standard deviation
    ks_statistic: float
    ks_pvalue: float
    psi: float
    wasserstein: float | None


@dataclass(frozen=True)
class NgRateDrift:
    """The live NG rate against the calibrated false-reject rate (the NG rate expected of OK parts)."""

    status: str
    live: float
    calibrated: float
    n_live: int
    pvalue: float


@dataclass(frozen=True)
class RoiDrift:
    """The drift of one served model (recipe, role, ROI, model key) over its live window.

    ``status``: ok | warn | alarm | no_reference | insufficient_data; ``cause``: lighting | focus | score | None;
    ``since``: when the status last changed (UTC ISO, persisted so every worker says the same); ``feedback``: the
    operator feedback's rates (docs/monitoring.md "Operator feedback"), when any."""

    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str
    memory_fingerprint: str | None
    status: str
    cause: str | None
    n_live: int
    series: dict[str, SeriesDrift] = field(default_factory=dict)
    ng_rate: NgRateDrift | None = None
    since: str | None = None
    feedback: dict[str, object] | None = None

    @property
    def key(self) -> str:
        """The one string that names this model in the drift state file."""
        return "/".join((self.recipe_id, self.role_id, self.roi_id, self.model_key))

    @property
    def level(self) -> int | None:
        """0 ok, 1 warn, 2 alarm (``bdi_drift_status``); None when not evaluated (no reference, too few records)."""
        return STATUS_LEVEL.get(self.status)

    def statistics(self) -> dict[str, float]:
        """Flat ``<series>_<statistic>`` numbers (``bdi_drift_statistic``'s ``statistic`` label, MLflow metrics)."""
        out: dict[str, float] = {}
        for name, series in self.series.items():
            out[f"{name}_ks"] = series.ks_statistic
            out[f"{name}_ks_pvalue"] = series.ks_pvalue
            out[f"{name}_psi"] = series.psi
            out[f"{name}_live_mean"] = series.live_mean
            if series.wasserstein is not None:
                out[f"{name}_wasserstein"] = series.wasserstein
        if self.ng_rate is not None:
            out["ng_rate_live"] = self.ng_rate.live
            out["ng_rate_calibrated"] = self.ng_rate.calibrated
            out["ng_rate_pvalue"] = self.ng_rate.pvalue
        for name in ("false_reject_rate", "escape_rate", "recall"):
            value = (self.feedback or {}).get(name)
            if isinstance(value, (int, float)):
                out[f"feedback_{name}"] = float(value)
        return out

    def metrics_row(self) -> dict[str, object] | None:
        """``{"recipe_id", "role_id", "roi_id", "status", "statistics"}`` for ``serving.metrics.exposition.
        drift_families`` (gauges ``bdi_drift_status`` and ``bdi_drift_statistic``); None when not evaluated
        (no_reference, insufficient_data), so no gauge claims a status nobody computed."""
        if self.level is None:
            return None
        return {"recipe_id": self.recipe_id, "role_id": self.role_id, "roi_id": self.roi_id, "status": self.status,
                "statistics": self.statistics()}

    def to_dict(self) -> dict[str, object]:
        body = asdict(self)
        body["level"] = self.level
        return body


def psi(reference: np.ndarray, live: np.ndarray, *, bins: int = PSI_BINS) -> float:
    """Population stability index of ``live`` against ``reference`` over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1) / reference.size
    live_share = np.bincount(np.searchsorted(edges, live, side="right"), minlength=edges.size + 1) / live.size
    ref_share = np.maximum(ref_share, PSI_EPSILON)
    live_share = np.maximum(live_share, PSI_EPSILON)
    return float(np.sum((live_share - ref_share) * np.log(live_share / ref_share)))


def _status(psi_value: float, pvalue: float) -> str:
    if psi_value >= PSI_ALARM and pvalue < KS_P_ALARM:
        return ALARM
    if psi_value >= PSI_WARN and pvalue < KS_P_WARN:
        return WARN
    return OK


def series_drift(name: str, reference: Sequence[float], live: Sequence[float]) -> SeriesDrift:
    """The statistics of one series (see the module docstring)."""
    ref = np.asarray(reference, dtype=np.float64)
    now = np.asarray(live, dtype=np.float64)
    test = ks_2samp(ref, now)
    pvalue = float(test.pvalue)
    psi_value = psi(ref, now)
    wasser = float(wasserstein_distance(ref, now)) if ref.size >= WASSERSTEIN_MIN_REFERENCE else None
    spread = float(ref.std())
    effect = (float(now.mean()) - float(ref.mean())) / spread if spread > 0 else 0.0
    return SeriesDrift(name=name, status=_status(psi_value, pvalue), n_reference=int(ref.size), n_live=int(now.size),
                       reference_mean=float(ref.mean()), live_mean=float(now.mean()), effect=effect,
                       ks_statistic=float(test.statistic), ks_pvalue=pvalue, psi=psi_value, wasserstein=wasser)


def ng_rate_drift(decisions: Sequence[str], *, calibrated: float | None, n_reference: int) -> NgRateDrift | None:
    """The live NG rate tested against ``calibrated`` (None: no calibrated rate, nothing to test). A calibrated rate
    of 0 is taken as 1/(n_reference+1): no finite OK sample set proves a rate of exactly 0."""
    if calibrated is None or not decisions:
        return None
    n_ng = sum(1 for d in decisions if d == "ng")
    expected = min(max(calibrated, 1.0 / (n_reference + 1)), 1.0)
    pvalue = float(binomtest(n_ng, len(decisions), expected, alternative="greater").pvalue)
    status = ALARM if pvalue < NG_P_ALARM else WARN if pvalue < NG_P_WARN else OK
    return NgRateDrift(status=status, live=n_ng / len(decisions), calibrated=float(calibrated),
                       n_live=len(decisions), pvalue=pvalue)


def _log_ratio(series: SeriesDrift | None) -> float:
    """|log(live mean / reference mean)|: how far a positive series moved, whatever its unit (0 when not)."""
    if series is None or series.reference_mean <= 0 or series.live_mean <= 0:
        return 0.0
    return abs(math.log(series.live_mean / series.reference_mean))


def _cause(series: Mapping[str, SeriesDrift], ng: NgRateDrift | None) -> str | None:
    """lighting, focus or score (the module docstring). A gain change scales the contrast by k and the Laplacian's
    variance by k², so focus is the sharpness change beyond what the contrast change explains."""
    moved = {name: s for name, s in series.items() if s.status != OK}
    if any(name in moved for name in IMAGE_CAUSES):
        contrast = series.get("contrast")
        sharp = series.get("sharpness")
        lighting = max(_log_ratio(moved.get("brightness")), _log_ratio(moved.get("contrast")))
        focus = 0.0
        if "sharpness" in moved and sharp is not None and sharp.reference_mean > 0 and sharp.live_mean > 0:
            gain = (math.log(contrast.live_mean / contrast.reference_mean)
                    if contrast is not None and contrast.reference_mean > 0 and contrast.live_mean > 0 else 0.0)
            focus = abs(math.log(sharp.live_mean / sharp.reference_mean) - 2.0 * gain)
        return CAUSE_FOCUS if focus > lighting else CAUSE_LIGHTING
    if SCORE in moved or (ng is not None and ng.status != OK):
        return CAUSE_SCORE
    return None


def evaluate_roi(
    *,
    ids: Mapping[str, str],
    memory_fingerprint: str | None,
    reference: Mapping[str, Sequence[float]] | None,
    calibrated_ng_rate: float | None,
    live: Sequence[InspectionRecord],
    min_count: int,
) -> RoiDrift:
    """The drift of one model: ``ids`` its recipe/role/roi/model_key, ``live`` its window (any order)."""
    base = {"recipe_id": ids["recipe_id"], "role_id": ids["role_id"], "roi_id": ids["roi_id"],
            "model_key": ids["model_key"], "memory_fingerprint": memory_fingerprint, "n_live": len(live)}
    if not reference or not reference.get(SCORE):
        return RoiDrift(**base, status=NO_REFERENCE, cause=None)  # type: ignore[arg-type]
    if len(live) < min_count:
        return RoiDrift(**base, status=INSUFFICIENT, cause=None)  # type: ignore[arg-type]
    series: dict[str, SeriesDrift] = {}
    for name in SERIES:
        ref_values = [v for v in reference.get(name, ()) if math.isfinite(v)]
        live_values = [float(getattr(r, name)) for r in live if math.isfinite(float(getattr(r, name)))]
        if len(ref_values) >= 2 and len(live_values) >= min_count:
            series[name] = series_drift(name, ref_values, live_values)
    ng = ng_rate_drift([r.decision for r in live], calibrated=calibrated_ng_rate,
                       n_reference=len(reference.get(SCORE, ())))
    levels = [STATUS_LEVEL[s.status] for s in series.values()] + ([STATUS_LEVEL[ng.status]] if ng else [])
    worst = max(levels, default=0)
    status = next(name for name, level in STATUS_LEVEL.items() if level == worst)
    return RoiDrift(**base, status=status, cause=_cause(series, ng) if worst else None,  # type: ignore[arg-type]
                    series=series, ng_rate=ng)


def metrics_rows(drifts: Sequence[RoiDrift]) -> list[dict[str, object]]:
    """The gauge rows of the evaluated drifts (:meth:`RoiDrift.metrics_row`): what ``drift_families`` takes, e.g.
    ``scrape_collectors.add(lambda: drift_families(metrics_rows(service.monitor())))``."""
    return [row for row in (drift.metrics_row() for drift in drifts) if row is not None]
