"""Threshold selection from OK/NG scores (docs/contract.md "Threshold rule"), the typed calibration and its validity."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bdi.config import CalibrationConfig, ScoringConfig
from bdi.errors import BDIError, CalibrationMissingError, InsufficientSamplesError, InvalidInputError
from bdi.refs import ModelRef

NO_OK_SCORE_MESSAGE = "Se requiere al menos 1 score OK para calibrar (at least 1 finite OK score is required)"


def finite_scores(values: Iterable[Any] | None, *, name: str) -> np.ndarray:
    """Float64 array of the finite values; a non-numeric entry is an InvalidInputError."""
    if values is None:
        return np.empty(0, dtype=np.float64)
    if isinstance(values, (str, bytes, Mapping)):
        raise InvalidInputError(f"{name} must be a list of numbers")
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"{name} must contain only numbers, got {value!r}")
        if math.isfinite(value):
            out.append(float(value))
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and the statistics it came from.

    ``ok_score_at_percentile`` is the OK scores' percentile at ``score_percentile`` (stored as ``p99_ok``),
    ``ng_score_at_percentile`` the NG scores' at ``CalibrationConfig.ng_percentile`` (stored as ``p5_ng``;
    None without NG scores). ``false_reject_rate`` is the share of OK scores ≥ threshold; ``escape_rate``
    the share of NG scores < threshold (None without NG scores).
    """

    threshold: float
    ok_mean: float
    ng_mean: float
    ok_score_at_percentile: float
    ng_score_at_percentile: float | None
    n_ok: int
    n_ng: int
    score_percentile: float
    false_reject_rate: float
    escape_rate: float | None


def resolved_percentile(scoring: ScoringConfig) -> int:
    """The score percentile of a resolved ``scoring`` (``ScoringConfig.resolved``: the backbone's when unset).

    Raises:
        ValueError: ``scoring`` is not resolved (a programming error: ``Settings.model`` always is).
    """
    if scoring.score_percentile is None:
        raise ValueError("an unresolved ScoringConfig has no score_percentile: resolve it for the backbone first")
    return scoring.score_percentile


def choose_threshold(
    ok_scores: Iterable[Any],
    ng_scores: Iterable[Any] | None = None,
    *,
    score_percentile: float,
    cfg: CalibrationConfig | None = None,
) -> ThresholdChoice:
    """The contract's threshold rule: p_ok = P-th percentile of OK; without NG, threshold = p_ok; else with
    p_ng = 5th percentile of NG: threshold = 1.02·p_ok when p_ng ≤ p_ok, else (p_ok + p_ng)/2.

    ``score_percentile`` is P, in [0, 100]: the resolved ``ScoringConfig.score_percentile`` or the request's.
    """
    cfg = cfg or CalibrationConfig()
    if not 0.0 <= score_percentile <= 100.0:
        raise InvalidInputError(f"score_percentile must be in [0, 100], got {score_percentile}")
    ok = finite_scores(ok_scores, name="ok_scores")
    ng = finite_scores(ng_scores, name="ng_scores")
    if ok.size == 0:
        raise InsufficientSamplesError(NO_OK_SCORE_MESSAGE)
    p_ok = float(np.percentile(ok, score_percentile))
    p_ng: float | None = None
    if ng.size == 0:
        threshold = p_ok
    else:
        p_ng = float(np.percentile(ng, cfg.ng_percentile))
        threshold = cfg.overlap_factor * p_ok if p_ng <= p_ok else (p_ok + p_ng) / 2.0
    return ThresholdChoice(
        threshold=float(threshold),
        ok_mean=float(ok.mean()),
        ng_mean=float(ng.mean()) if ng.size else 0.0,
        ok_score_at_percentile=p_ok,
        ng_score_at_percentile=p_ng,
        n_ok=int(ok.size),
        n_ng=int(ng.size),
        score_percentile=float(score_percentile),
        false_reject_rate=float((ok >= threshold).mean()),
        escape_rate=float((ng < threshold).mean()) if ng.size else None,
    )


def decide(score: float, threshold: float) -> str:
    """``"ng"`` when ``score`` reaches the threshold, else ``"ok"``."""
    return "ng" if score >= threshold else "ok"


REVIEW = "review"  # Band.verdict of a score between the band's thresholds
BAND_KEYS = ("threshold_low", "threshold_high")  # the calib JSON keys that make a band (additive)


@dataclass(frozen=True)
class Band:
    """The OK / review / NG operating band (docs/design.md "Two thresholds: OK, review, NG").

    A score below ``threshold_low`` is OK, one at or above ``threshold_high`` NG, one in between goes to human
    review. ``threshold_low`` comes from the NG calibration scores (at most ``escape_budget`` of them below it:
    passed unseen), ``threshold_high`` from the OK ones (at most ``false_reject_budget`` of them at or above it:
    rejected unseen), so the review lane is where the two classes overlap. When the classes do not overlap that
    much the two cross; the band then ``collapsed`` to one threshold (low == high, nothing goes to review) that
    meets both budgets. The rates are on the calibration scores; None where that class had no score.
    """

    threshold_low: float
    threshold_high: float
    escape_budget: float
    false_reject_budget: float
    collapsed: bool
    escape_rate: float | None = None
    false_reject_rate: float | None = None
    review_rate: float | None = None

    def verdict(self, score: float) -> str:
        """``"ok"`` below ``threshold_low``, ``"ng"`` at or above ``threshold_high``, else ``"review"``."""
        if score >= self.threshold_high:
            return "ng"
        return "ok" if score < self.threshold_low else REVIEW

    def to_dict(self) -> dict[str, Any]:
        """The calib JSON keys (additive: a file without them has no band)."""
        return {"threshold_low": self.threshold_low, "threshold_high": self.threshold_high,
                "band_escape_budget": self.escape_budget, "band_false_reject_budget": self.false_reject_budget,
                "band_collapsed": self.collapsed, "band_escape_rate": self.escape_rate,
                "band_false_reject_rate": self.false_reject_rate, "review_rate": self.review_rate}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Band | None:
        """The band of a calib JSON object; None unless both thresholds are finite numbers with low <= high."""
        low, high = _number(data.get("threshold_low")), _number(data.get("threshold_high"))
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low > high:
            return None
        return cls(threshold_low=low, threshold_high=high,
                   escape_budget=_number(data.get("band_escape_budget")) or 0.0,
                   false_reject_budget=_number(data.get("band_false_reject_budget")) or 0.0,
                   collapsed=data.get("band_collapsed") is True or low == high,
                   escape_rate=_number(data.get("band_escape_rate")),
                   false_reject_rate=_number(data.get("band_false_reject_rate")),
                   review_rate=_number(data.get("review_rate")))


@dataclass(frozen=True)
class BandRates:
    """Where a band sends labelled scores: escapes (NG below low) / NG, false rejects (OK at or above high) / OK,
    and the share of all parts sent to review (None where that class, or any part, is missing)."""

    escape_rate: float | None
    false_reject_rate: float | None
    review_rate: float | None
    n_review: int


def band_rates(ok_scores: np.ndarray, ng_scores: np.ndarray, *, low: float, high: float) -> BandRates:
    """The :class:`BandRates` of OK and NG scores at the band ``[low, high)``."""
    ok, ng = np.asarray(ok_scores, dtype=np.float64), np.asarray(ng_scores, dtype=np.float64)
    n_review = int(np.sum((ok >= low) & (ok < high)) + np.sum((ng >= low) & (ng < high)))
    total = ok.size + ng.size
    return BandRates(escape_rate=float(np.mean(ng < low)) if ng.size else None,
                     false_reject_rate=float(np.mean(ok >= high)) if ok.size else None,
                     review_rate=n_review / total if total else None, n_review=n_review)


def choose_band(ok_scores: Iterable[Any], ng_scores: Iterable[Any], *, threshold: float,
                cfg: CalibrationConfig | None = None) -> Band | None:
    """The band of the budgets in ``cfg``; None without OK or NG scores (OK-only keeps the single threshold).

    ``threshold_low`` = the (k+1)-th lowest NG score, k = floor(escape_budget · n_ng): exactly the k lowest NG
    scores (fewer with ties) fall below it. ``threshold_high`` = just above the (m+1)-th highest OK score,
    m = floor(false_reject_budget · n_ok): at most the m highest OK scores reach it. When low ≥ high (the classes
    overlap less than the budgets allow) the band collapses to ``threshold`` (the single rule's) clipped into
    [high, low], which meets both budgets.
    """
    cfg = cfg or CalibrationConfig()
    ok = np.sort(finite_scores(ok_scores, name="ok_scores"))
    ng = np.sort(finite_scores(ng_scores, name="ng_scores"))
    if ok.size == 0 or ng.size == 0:
        return None
    k = min(int(math.floor(cfg.escape_budget * ng.size + 1e-9)), ng.size - 1)
    m = min(int(math.floor(cfg.false_reject_budget * ok.size + 1e-9)), ok.size - 1)
    low = float(ng[k])
    high = float(np.nextafter(ok[ok.size - 1 - m], np.inf))
    collapsed = low >= high
    if collapsed:
        low = high = float(min(max(threshold, high), low))
    rates = band_rates(ok, ng, low=low, high=high)
    return Band(threshold_low=low, threshold_high=high, escape_budget=cfg.escape_budget,
                false_reject_budget=cfg.false_reject_budget, collapsed=collapsed, escape_rate=rates.escape_rate,
                false_reject_rate=rates.false_reject_rate, review_rate=rates.review_rate)


@dataclass(frozen=True)
class Verdict:
    """One score judged by a calibration: ``decision`` (the legacy ok/ng, a review score on ``review_decision``'s
    side), ``review`` (the score is in the band) and the thresholds it was judged with."""

    decision: str
    review: bool
    threshold_low: float | None
    threshold_high: float | None


def judge(score: float, *, threshold: float, band: Band | None, review_decision: str = "ng") -> Verdict:
    """The verdict of ``score``: with a band, its lane (a review score decided ``review_decision``); without,
    :func:`decide` at ``threshold`` and never review."""
    if band is None:
        return Verdict(decision=decide(score, threshold), review=False, threshold_low=None, threshold_high=None)
    lane = band.verdict(score)
    return Verdict(decision=review_decision if lane == REVIEW else lane, review=lane == REVIEW,
                   threshold_low=band.threshold_low, threshold_high=band.threshold_high)


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _model_ref(data: Mapping[str, Any]) -> ModelRef | None:
    """The model ids a calibration records (``ModelRef.to_dict`` keys); None when absent or not valid ids."""
    recipe_id, role_id, roi_id, model_key = (
        _text(data.get(key)) for key in ("recipe_id", "role_id", "roi_id", "model_key"))
    if recipe_id is None or role_id is None or roi_id is None or model_key is None:
        return None
    try:
        return ModelRef(recipe_id=recipe_id, role_id=role_id, roi_id=roi_id, model_key=model_key)
    except BDIError:
        return None


SCORE_SERIES = "score"  # the reference series of the OK scores
REFERENCE_MAX_VALUES = 2000  # per series: a calibration file stays small (a sample of the OK values beyond it)


def reference_series(values: Iterable[float], *, max_values: int = REFERENCE_MAX_VALUES) -> tuple[float, ...]:
    """The finite ``values`` as a reference series: at most ``max_values`` of them (evenly spaced in sorted order
    beyond that, which keeps the distribution), rounded to 7 significant digits."""
    finite = np.sort(np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64))
    if finite.size > max_values:
        finite = finite[np.linspace(0, finite.size - 1, max_values).round().astype(int)]
    return tuple(float(f"{v:.7g}") for v in finite)


def _reference(value: Any) -> dict[str, tuple[float, ...]] | None:
    """The ``reference`` object of a calib JSON (name → list of numbers); None when absent or not that shape."""
    if not isinstance(value, Mapping):
        return None
    out: dict[str, tuple[float, ...]] = {}
    for name, series in value.items():
        if isinstance(name, str) and isinstance(series, list):
            numbers = [_number(v) for v in series]
            out[name] = tuple(v for v in numbers if v is not None)
    return out or None


STATISTICS_KEYS = ("ok_mean", "ng_mean", "p99_ok", "p5_ng")  # their JSON keys (docs/contract.md "POST /calibrate_ng")


@dataclass(frozen=True)
class ScoreStatistics:
    """The OK/NG score statistics ``/calibrate_ng`` stores: the OK scores' mean and percentile at the
    calibration's ``score_percentile`` (key ``p99_ok``), the NG scores' mean and percentile at
    ``CalibrationConfig.ng_percentile`` (key ``p5_ng``; None without NG)."""

    ok_mean: float
    ng_mean: float
    ok_score_at_percentile: float | None
    ng_score_at_percentile: float | None

    @classmethod
    def of(cls, choice: ThresholdChoice) -> ScoreStatistics:
        return cls(ok_mean=choice.ok_mean, ng_mean=choice.ng_mean, ok_score_at_percentile=choice.ok_score_at_percentile,
                   ng_score_at_percentile=choice.ng_score_at_percentile)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreStatistics | None:
        """The statistics of a calib JSON object; None unless it has all four keys."""
        if not all(key in data for key in STATISTICS_KEYS):
            return None
        return cls(ok_mean=_number(data["ok_mean"]) or 0.0, ng_mean=_number(data["ng_mean"]) or 0.0,
                   ok_score_at_percentile=_number(data["p99_ok"]), ng_score_at_percentile=_number(data["p5_ng"]))

    def to_dict(self) -> dict[str, float | None]:
        """The JSON keys (docs/contract.md "POST /calibrate_ng": the names stay ``p99_ok`` and ``p5_ng``)."""
        return {"ok_mean": self.ok_mean, "ng_mean": self.ng_mean, "p99_ok": self.ok_score_at_percentile,
                "p5_ng": self.ng_score_at_percentile}


@dataclass(frozen=True)
class Calibration:
    """One model's calibration: the ``<base>_calib.json`` object (docs/contract.md "Files").

    ``memory_fingerprint`` names the memory the threshold was computed for (None: no memory was fitted
    then; such a calibration never applies). ``/calibrate_ng`` also stores the score ``statistics`` and
    the ``mm_per_px`` it was given; ``/calibrate_dataset`` stores the model's ``ids``. Fields that an
    older file lacks read as None.
    """

    threshold: float
    score_percentile: int  # the percentile scores were (and are) computed at, in [0, 100]
    area_mm2_thr: float  # regions smaller than this are dropped
    memory_fingerprint: str | None
    created_at_utc: str | None = None
    n_ok: int | None = None
    n_ng: int | None = None
    false_reject_rate: float | None = None  # share of OK scores >= threshold, in [0, 1]
    escape_rate: float | None = None  # share of NG scores < threshold, in [0, 1]; None without NG
    mm_per_px: float | None = None
    statistics: ScoreStatistics | None = None
    ids: ModelRef | None = None  # the model a /calibrate_dataset calibration belongs to (stored with it)
    source: str | None = None  # how the threshold was set when not by the threshold rule: "manual" (/calibrate_manual)
    # what the calibration saw of OK samples, the drift reference (docs/monitoring.md "Drift"): series name →
    # values: "score" (the OK scores) and, when calibrated from stored images, "brightness", "contrast", "sharpness"
    reference: Mapping[str, tuple[float, ...]] | None = None
    band: Band | None = None  # the OK / review / NG band (NG samples calibrated on); None: the single threshold

    @classmethod
    def from_choice(
        cls,
        choice: ThresholdChoice,
        *,
        area_mm2_thr: float,
        memory_fingerprint: str | None,
        created_at_utc: str,
        mm_per_px: float | None = None,
        statistics: bool = False,
        ids: ModelRef | None = None,
        band: Band | None = None,
    ) -> Calibration:
        """The calibration of a threshold choice (``statistics``: store its OK/NG statistics too)."""
        return cls(
            threshold=choice.threshold, score_percentile=int(choice.score_percentile), area_mm2_thr=area_mm2_thr,
            memory_fingerprint=memory_fingerprint, created_at_utc=created_at_utc, n_ok=choice.n_ok,
            n_ng=choice.n_ng, false_reject_rate=choice.false_reject_rate, escape_rate=choice.escape_rate,
            mm_per_px=mm_per_px, statistics=ScoreStatistics.of(choice) if statistics else None, ids=ids, band=band,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, defaults: ScoringConfig) -> Calibration:
        """Read a calib JSON object, old files included: a missing (or out of range) percentile or area is
        ``defaults``', the resolved scoring config (:func:`resolved_percentile`).

        Raises:
            CalibrationMissingError: the object is empty, or its threshold is missing or not a number.
            ValueError: the percentile is missing and ``defaults`` is not resolved.
        """
        if not data:
            raise CalibrationMissingError()
        threshold = _number(data.get("threshold"))
        if threshold is None:
            raise CalibrationMissingError("threshold missing")
        percentile = _number(data.get("score_percentile"))
        if percentile is None or not 0.0 <= percentile <= 100.0:
            percentile = resolved_percentile(defaults)
        area = _number(data.get("area_mm2_thr"))
        n_ok, n_ng = _number(data.get("n_ok")), _number(data.get("n_ng"))
        return cls(
            threshold=threshold,
            score_percentile=int(percentile),
            area_mm2_thr=defaults.area_mm2_thr if area is None else area,
            memory_fingerprint=_text(data.get("memory_fingerprint")),
            created_at_utc=_text(data.get("created_at_utc")),
            n_ok=None if n_ok is None else int(n_ok),
            n_ng=None if n_ng is None else int(n_ng),
            false_reject_rate=_number(data.get("false_reject_rate")),
            escape_rate=_number(data.get("escape_rate")),
            mm_per_px=_number(data.get("mm_per_px")),
            statistics=ScoreStatistics.from_dict(data),
            ids=_model_ref(data),
            source=_text(data.get("source")),
            reference=_reference(data.get("reference")),
            band=Band.from_dict(data),
        )

    def to_dict(self) -> dict[str, Any]:
        """The calib JSON object (the keys its writer has always stored; ``None`` parts are left out)."""
        body: dict[str, Any] = {"threshold": self.threshold}
        if self.statistics is not None:
            body.update(self.statistics.to_dict())
        if self.mm_per_px is not None:
            body["mm_per_px"] = self.mm_per_px
        body.update(area_mm2_thr=self.area_mm2_thr, score_percentile=self.score_percentile)
        if self.ids is not None:
            body.update(self.ids.to_dict())
        body.update(created_at_utc=self.created_at_utc, memory_fingerprint=self.memory_fingerprint,
                    n_ok=self.n_ok, n_ng=self.n_ng, false_reject_rate=self.false_reject_rate,
                    escape_rate=self.escape_rate)
        if self.source is not None:
            body["source"] = self.source
        if self.reference is not None:
            body["reference"] = {name: list(series) for name, series in self.reference.items()}
        if self.band is not None:
            body.update(self.band.to_dict())
        return body

    def metrics(self) -> dict[str, float | None]:
        """What tracking logs as metrics: the threshold, the rates, the statistics and the counts."""
        stats = self.statistics
        return {
            "threshold": self.threshold,
            "false_reject_rate": self.false_reject_rate,
            "escape_rate": self.escape_rate,
            "ok_mean": stats.ok_mean if stats else None,
            "ng_mean": stats.ng_mean if stats else None,
            "p99_ok": stats.ok_score_at_percentile if stats else None,
            "p5_ng": stats.ng_score_at_percentile if stats else None,
            "n_ok": None if self.n_ok is None else float(self.n_ok),
            "n_ng": None if self.n_ng is None else float(self.n_ng),
            **self.band_metrics(),
        }

    def band_metrics(self) -> dict[str, float | None]:
        """The band's figures for tracking (empty without a band): its thresholds, whether it collapsed, and the
        escape, false-reject and review rates it gives on the calibration scores."""
        band = self.band
        if band is None:
            return {}
        return {"threshold_low": band.threshold_low, "threshold_high": band.threshold_high,
                "band_collapsed": float(band.collapsed), "band_escape_rate": band.escape_rate,
                "band_false_reject_rate": band.false_reject_rate, "review_rate": band.review_rate}

    def judge(self, score: float, *, review_decision: str = "ng") -> Verdict:
        """:func:`judge` with this calibration's threshold and band."""
        return judge(score, threshold=self.threshold, band=self.band, review_decision=review_decision)

    def scoring(self, base: ScoringConfig) -> ScoringConfig:
        """``base`` with the percentile and the area this calibration was made with."""
        return replace(base, score_percentile=self.score_percentile, area_mm2_thr=self.area_mm2_thr)


def usable_calibration(calib: Calibration | None, *, memory_fingerprint: str) -> Calibration:
    """``calib`` when it applies to the given memory.

    Raises CalibrationMissingError when there is no calibration, its threshold is not finite or ≤ 0,
    it records a different memory (it was computed before a refit), or it records no memory at all: a
    calibration made before any fit (stored unbound) or by a backend that did not record one never
    applies, because staleness cannot be ruled out without the fingerprint.
    """
    if calib is None:
        raise CalibrationMissingError()
    if not math.isfinite(calib.threshold):
        raise CalibrationMissingError("threshold missing")
    if calib.threshold <= 0:
        raise CalibrationMissingError("threshold <= 0")
    if not calib.memory_fingerprint:
        raise CalibrationMissingError(
            "unbound: calibrated without a fitted memory (or by a backend that records none), recalibrate"
        )
    if calib.memory_fingerprint != memory_fingerprint:
        raise CalibrationMissingError("stale: calibrated for another memory, recalibrate after the refit")
    return calib
