"""Both folds and their intervals (issue 29 "Measure so a difference is real").

A row is fitted once on train/good and scores both test halves once; the folds then differ only in which half
calibrates and which one reports: fold 1 calibrates on the pipeline's calib half and reports on its eval half,
fold 2 the other way round. Per fold, on the reporting half: image AUROC, pixel AUROC, AUPRO, the false-reject and
escape rates at the threshold calibrated on the other half (BDI's contract rule), the false-reject rate at a fixed
escape budget (0 % and 5 % escapes on the reporting half itself: the ROC's operating point, no calibration), and
where the OK / review / NG band calibrated on the other half sends the reporting half (escape, false reject,
review share). The mean of the two folds is reported beside them.

Intervals: a seeded bootstrap over images, stratified (OK and NG images resampled apart, each at its own count),
95 % percentile intervals. The mean's interval resamples both folds' reporting halves at once. A difference
between two rows is a paired bootstrap (the same resampled images for both rows): "better" / "worse" only where
its interval excludes 0, else "no difference shown".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bdi.config import CalibrationConfig
from bdi.data import metrics
from bdi.data.metrics import image_auroc
from bdi.patchcore.calibration import band_rates, choose_band, choose_threshold

ESCAPE_BUDGETS = (0.0, 0.05)  # the fixed escape budgets the false-reject rate is read at
CONFIDENCE = 0.95
N_BOOT = 1000  # resamples of the image-level figures
N_BOOT_PIXEL = 50  # of the pixel-level ones (each resample recomputes a pixel AUROC / AUPRO over every pixel)
SEED = 0

IMAGE_KEYS = ("image_auroc", "false_reject_rate", "escape_rate", "frr_at_escape_0", "frr_at_escape_5",
              "band_escape_rate", "band_false_reject_rate", "review_rate")
PIXEL_KEYS = ("pixel_auroc", "aupro")
KEYS = ("image_auroc", "pixel_auroc", "aupro", *IMAGE_KEYS[1:])


@dataclass(frozen=True)
class Half:
    """One test half as a row scored it: labels (1 = NG), image scores, anomaly maps and masks (None: unknown)."""

    labels: np.ndarray
    scores: np.ndarray
    maps: Sequence[np.ndarray] | None = None
    masks: Sequence[np.ndarray | None] | None = None

    def ok(self) -> np.ndarray:
        return np.asarray(self.scores[self.labels == 0], dtype=np.float64)

    def ng(self) -> np.ndarray:
        return np.asarray(self.scores[self.labels == 1], dtype=np.float64)


@dataclass(frozen=True)
class Operating:
    """What one calibration half sets: the contract threshold and the band (None without NG)."""

    threshold: float
    band_low: float | None
    band_high: float | None


def calibrate(half: Half, *, score_percentile: int, cfg: CalibrationConfig) -> Operating:
    """BDI's threshold rule and band on a calibration half."""
    ok, ng = list(half.ok()), list(half.ng())
    threshold = choose_threshold(ok, ng or None, score_percentile=score_percentile, cfg=cfg).threshold
    band = choose_band(ok, ng, threshold=threshold, cfg=cfg)
    return Operating(threshold=float(threshold), band_low=band.threshold_low if band else None,
                     band_high=band.threshold_high if band else None)


def frr_at_escape_budget(ok: np.ndarray, ng: np.ndarray, budget: float) -> float | None:
    """The smallest false-reject rate of any threshold letting at most ``budget`` of the NG scores escape (score
    below it): the threshold is the (k+1)-th lowest NG score, k = floor(budget · n_ng)."""
    if ok.size == 0 or ng.size == 0:
        return None
    k = min(int(math.floor(budget * ng.size + 1e-9)), ng.size - 1)
    threshold = float(np.sort(ng)[k])
    return float(np.mean(ok >= threshold))


def image_figures(ok: np.ndarray, ng: np.ndarray, op: Operating) -> dict[str, float | None]:
    """Every image-level figure of one reporting half (OK and NG scores) at the operating point ``op``."""
    labels = np.r_[np.zeros(ok.size), np.ones(ng.size)]
    out: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, np.r_[ok, ng]),
        "false_reject_rate": float(np.mean(ok >= op.threshold)) if ok.size else None,
        "escape_rate": float(np.mean(ng < op.threshold)) if ng.size else None,
        "frr_at_escape_0": frr_at_escape_budget(ok, ng, ESCAPE_BUDGETS[0]),
        "frr_at_escape_5": frr_at_escape_budget(ok, ng, ESCAPE_BUDGETS[1]),
    }
    if op.band_low is not None and op.band_high is not None:
        rates = band_rates(ok, ng, low=op.band_low, high=op.band_high)
        out.update(band_escape_rate=rates.escape_rate, band_false_reject_rate=rates.false_reject_rate,
                   review_rate=rates.review_rate)
    else:
        out.update(band_escape_rate=None, band_false_reject_rate=None, review_rate=None)
    return out


def pixel_figures(half: Half, index: np.ndarray) -> dict[str, float | None]:
    """Pixel AUROC and AUPRO of the images ``index`` of ``half`` whose mask is known (OK: no defect pixel)."""
    if half.maps is None or half.masks is None:
        return {"pixel_auroc": None, "aupro": None}
    auroc, pro = metrics.pixel_figures(half.labels, half.maps, half.masks, index)
    return {"pixel_auroc": auroc, "aupro": pro}


def _resample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stratified bootstrap resample of image indices: OK and NG each drawn at their own count."""
    parts = [rng.choice(np.flatnonzero(labels == v), size=int(np.sum(labels == v)), replace=True)
             for v in (0, 1) if np.any(labels == v)]
    return np.concatenate(parts)


def _interval(values: Sequence[float | None]) -> tuple[float, float] | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 10:
        return None
    alpha = (1.0 - CONFIDENCE) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


FoldFn = Callable[[Half, np.ndarray, Operating], dict[str, float | None]]


def _image_fn(half: Half, index: np.ndarray, op: Operating) -> dict[str, float | None]:
    sub_labels, sub_scores = half.labels[index], half.scores[index]
    return image_figures(sub_scores[sub_labels == 0].astype(np.float64),
                         sub_scores[sub_labels == 1].astype(np.float64), op)


def _pixel_fn(half: Half, index: np.ndarray, op: Operating) -> dict[str, float | None]:
    return pixel_figures(half, index)


def _boot(folds: Sequence[tuple[Half, Operating]], fn: FoldFn, keys: Sequence[str], n_boot: int,
          seed: int) -> dict[str, list[list[float | None]]]:
    """``{key: [[fold 1 value, fold 2 value, …] per resample]}``; each resample draws every fold's half anew."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[float | None]]] = {k: [] for k in keys}
    for _ in range(n_boot):
        values = [fn(half, _resample(half.labels, rng), op) for half, op in folds]
        for k in keys:
            out[k].append([v[k] for v in values])
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if len(finite) == len(values) and finite else None


@dataclass(frozen=True)
class FoldResamples:
    """A row's bootstrap resamples, kept so two rows can be compared pairwise (same seed: same images)."""

    image: dict[str, list[list[float | None]]]
    pixel: dict[str, list[list[float | None]]]


def fold_report(folds: Sequence[tuple[Half, Operating]], *, n_boot: int = N_BOOT, n_boot_pixel: int = N_BOOT_PIXEL,
                seed: int = SEED) -> tuple[dict[str, Any], FoldResamples]:
    """Per fold and for their mean: every figure with its 95 % interval (``{key: {"value", "ci"}}``)."""
    full = [np.arange(half.labels.size) for half, _ in folds]
    point = [{**_image_fn(half, idx, op), **_pixel_fn(half, idx, op)} for (half, op), idx in zip(folds, full,
                                                                                                  strict=True)]
    image = _boot(folds, _image_fn, IMAGE_KEYS, n_boot, seed)
    pixel = _boot(folds, _pixel_fn, PIXEL_KEYS, n_boot_pixel, seed) if n_boot_pixel > 0 else {k: [] for k in
                                                                                             PIXEL_KEYS}
    samples = {**image, **pixel}
    report: dict[str, Any] = {"folds": [], "mean": {}}
    for f, values in enumerate(point):
        report["folds"].append({k: {"value": values[k], "ci": _interval([s[f] for s in samples[k]])} for k in KEYS})
    for k in KEYS:
        report["mean"][k] = {"value": _mean([v[k] for v in point]),
                             "ci": _interval([_mean(s) for s in samples[k]])}
    report["operating"] = [{"threshold": op.threshold, "band_low": op.band_low, "band_high": op.band_high}
                           for _, op in folds]
    return report, FoldResamples(image=image, pixel=pixel)


# higher is better for these; lower for every rate
HIGHER_IS_BETTER = {"image_auroc", "pixel_auroc", "aupro"}


def compare(ours: tuple[Mapping[str, Any], FoldResamples], theirs: tuple[Mapping[str, Any], FoldResamples]
            ) -> dict[str, dict[str, Any]]:
    """The paired difference (ours − theirs) of the fold means, its 95 % interval and the verdict for us:
    ``better`` / ``worse`` only where the interval excludes 0, else ``no difference shown``."""
    out: dict[str, dict[str, Any]] = {}
    for k in KEYS:
        a = ours[1].image.get(k) or ours[1].pixel.get(k) or []
        b = theirs[1].image.get(k) or theirs[1].pixel.get(k) or []
        diffs = [None if (x := _mean(s)) is None or (y := _mean(t)) is None else x - y
                 for s, t in zip(a, b, strict=False)]
        va, vb = ours[0]["mean"][k]["value"], theirs[0]["mean"][k]["value"]
        ci = _interval(diffs)
        verdict = "no difference shown"
        if ci is not None and (ci[0] > 0 or ci[1] < 0):
            up = ci[0] > 0
            verdict = "better" if up == (k in HIGHER_IS_BETTER) else "worse"
        out[k] = {"diff": None if va is None or vb is None else va - vb, "ci": ci, "verdict": verdict}
    return out
