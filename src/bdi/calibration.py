"""Threshold selection from OK/NG scores (API_CONTRACT §3.5) and calibration validity."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import CalibrationConfig, ScoringConfig
from .errors import CalibrationMissingError, InsufficientSamplesError, InvalidInputError

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

    ``p99_ok`` is the OK percentile at the requested ``score_percentile`` (the key keeps the legacy
    name). ``false_reject_rate`` is the share of OK scores ≥ threshold; ``escape_rate`` the share of
    NG scores < threshold (None without NG scores).
    """

    threshold: float
    ok_mean: float
    ng_mean: float
    p99_ok: float
    p5_ng: float | None
    n_ok: int
    n_ng: int
    score_percentile: float
    false_reject_rate: float
    escape_rate: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threshold(
    ok_scores: Iterable[Any],
    ng_scores: Iterable[Any] | None = None,
    *,
    score_percentile: float | None = None,
    cfg: CalibrationConfig | None = None,
) -> ThresholdChoice:
    """Contract §3.5: p_ok = P-th percentile of OK; without NG, threshold = p_ok; else with
    p_ng = 5th percentile of NG: threshold = 1.02·p_ok when p_ng ≤ p_ok, else (p_ok + p_ng)/2.

    ``score_percentile`` (P, in [0, 100]) defaults to ``ScoringConfig.score_percentile`` (99).
    """
    cfg = cfg or CalibrationConfig()
    if score_percentile is None:
        score_percentile = ScoringConfig.score_percentile
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
        p99_ok=p_ok,
        p5_ng=p_ng,
        n_ok=int(ok.size),
        n_ng=int(ng.size),
        score_percentile=float(score_percentile),
        false_reject_rate=float((ok >= threshold).mean()),
        escape_rate=float((ng < threshold).mean()) if ng.size else None,
    )


def usable_threshold(calib: Mapping[str, Any] | None, *, memory_fingerprint: str) -> float:
    """The threshold of a calibration that applies to the given memory.

    Raises CalibrationMissingError when there is no calibration, its threshold is missing, not
    finite or ≤ 0, it records a different memory (it was computed before a refit), or it records no
    memory at all: a calibration made before any fit (stored unbound) or by a backend that did not
    record one never applies, because staleness cannot be ruled out without the fingerprint.
    """
    if not calib:
        raise CalibrationMissingError()
    threshold = calib.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise CalibrationMissingError("threshold missing")
    if threshold <= 0:
        raise CalibrationMissingError("threshold <= 0")
    recorded = calib.get("memory_fingerprint")
    if not isinstance(recorded, str) or not recorded:
        raise CalibrationMissingError(
            "unbound: calibrated without a fitted memory (or by a backend that records none), recalibrate"
        )
    if recorded != memory_fingerprint:
        raise CalibrationMissingError("stale: calibrated for another memory, recalibrate after the refit")
    return float(threshold)
