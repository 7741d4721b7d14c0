"""Evaluation metrics for anomaly detection: image/pixel AUROC, AUPRO, F1, error rates.

Conventions: a *label* is 1 for NG (defective) and 0 for OK; a *score* is higher for more anomalous;
the decision at a threshold is NG when ``score >= threshold`` (as ``service.decide``). Anomaly maps
are ``(H, W)`` float arrays, ground-truth masks ``(H, W)`` arrays where a non-zero value marks a defect
pixel (binarise grey masks first with ``binarize_mask``). A metric that is undefined for the data
(one class absent, no defect pixel) is ``None``, never a made-up number.

Only NumPy is imported at module import time; scikit-learn and SciPy are imported lazily by the functions
that need them. The plots are :mod:`bdi.data.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from bdi.errors import InvalidInputError

GOOD_CLASS = "good"
MASK_THRESHOLD = 127  # a ground-truth mask pixel above this is a defect (grey edges of 8-bit masks)
AUPRO_FPR_LIMIT = 0.3  # the PRO curve is integrated up to this false-positive rate

# Per-sample labels or scores: a list, tuple or 1-D numpy array.
Values: TypeAlias = Sequence[Any] | np.ndarray


# --------------------------------------------------------------------------------------------- inputs


def _labels_scores(labels: Values, scores: Values) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise InvalidInputError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise InvalidInputError("labels must be 0 (OK) or 1 (NG)")
    if not np.isfinite(s).all():
        raise InvalidInputError("scores must be finite")
    return y, s


def binarize_mask(mask: np.ndarray, *, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """``(H, W)`` bool: ``mask > threshold`` for integer masks (grey edges of 8-bit masks), ``mask`` for bool.

    Multi-channel masks are reduced with ``max`` over the last axis first.
    """
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype == bool:
        return arr
    return arr > threshold


def _map_mask_pairs(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(maps) != len(masks):
        raise InvalidInputError(f"maps and masks differ in length: {len(maps)} vs {len(masks)}")
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (amap, mask) in enumerate(zip(maps, masks, strict=True)):
        a = np.asarray(amap, dtype=np.float64)
        if a.ndim != 2:
            raise InvalidInputError(f"maps[{i}] must be (H, W), got shape {a.shape}")
        m = np.zeros(a.shape, dtype=bool) if mask is None else np.asarray(mask) != 0
        if m.ndim == 3:
            m = m.any(axis=2)
        if m.shape != a.shape:
            raise InvalidInputError(f"masks[{i}] has shape {m.shape}, its map has {a.shape}")
        pairs.append((a, m))
    return pairs


# --------------------------------------------------------------------------------------------- image level


def image_auroc(labels: Values, scores: Values) -> float | None:
    """Area under the ROC curve of image scores; ``None`` when OK or NG is absent."""
    y, s = _labels_scores(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def roc_points(labels: Values, scores: Values) -> list[dict[str, float | None]]:
    """ROC curve as ``[{"fpr", "tpr", "threshold"}]`` from (0, 0) to (1, 1); ``[]`` when one class is absent.

    The first point's threshold is ``None`` (scikit-learn's ``+inf``: nothing is called NG), so the
    list serialises to strict JSON.
    """
    y, s = _labels_scores(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return []
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th) if math.isfinite(th) else None}
        for f, t, th in zip(fpr, tpr, thresholds, strict=True)
    ]


@dataclass(frozen=True)
class RatesAtThreshold:
    """Confusion counts and rates at one threshold (NG when ``score >= threshold``).

    ``false_reject_rate`` = OK called NG / OK (None without OK); ``escape_rate`` = NG called OK / NG
    (None without NG). ``precision`` is None when nothing is called NG; ``f1`` is 0.0 then.
    """

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    false_reject_rate: float | None
    escape_rate: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def rates_at(labels: Values, scores: Values, threshold: float) -> RatesAtThreshold:
    """Confusion counts, precision/recall/F1, false-reject and escape rates at ``threshold``."""
    y, s = _labels_scores(labels, scores)
    pred = s >= float(threshold)
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    n_ng, n_ok = tp + fn, tn + fp
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / n_ng if n_ng else None
    if n_ng == 0:
        f1 = None
    else:
        f1 = 2 * tp / (2 * tp + fp + fn)
    return RatesAtThreshold(
        threshold=float(threshold), tp=tp, fp=fp, tn=tn, fn=fn, precision=precision, recall=recall,
        f1=f1, false_reject_rate=fp / n_ok if n_ok else None, escape_rate=fn / n_ng if n_ng else None,
    )


def f1_at(labels: Values, scores: Values, threshold: float) -> float | None:
    """F1 of the NG class when ``score >= threshold`` is called NG; ``None`` without NG samples."""
    return rates_at(labels, scores, threshold).f1


# --------------------------------------------------------------------------------------------- pixel level


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> float | None:
    """ROC AUC over every pixel of every map (defect pixels vs the rest); ``None`` when one is absent.

    ``masks[i] is None`` means image ``i`` has no defect pixel (a good image).
    """
    pairs = _map_mask_pairs(maps, masks)
    if not pairs:
        return None
    values = np.concatenate([a.ravel() for a, _ in pairs])
    truth = np.concatenate([m.ravel() for _, m in pairs])
    if truth.all() or not truth.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, values))


def pro_curve(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], *, n_thresholds: int = 200
) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-region-overlap curve: ``(fpr, pro)``, each ``(n_thresholds + 1,)`` float64, fpr ascending.

    For each threshold ``t`` (``n_thresholds`` values evenly spaced from the largest to the smallest map
    value, plus one above the largest), a pixel is predicted defective when ``map >= t``:
    - ``fpr(t)``: share of the non-defect pixels (of all images) predicted defective;
    - ``pro(t)``: mean, over every connected ground-truth region (8-connectivity, each image separately),
      of the share of that region's pixels predicted defective. Every region weighs the same,
      whatever its size (Bergmann et al., MVTec AD, IJCV 2021).
    Both are non-decreasing as ``t`` falls, so the points run from (0, 0) to (1, 1).
    ``None`` when there is no defect region or no non-defect pixel.
    """
    if n_thresholds < 2:
        raise InvalidInputError("n_thresholds must be >= 2")
    pairs = _map_mask_pairs(maps, masks)
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=bool)
    regions: list[np.ndarray] = []  # sorted map values of each defect region
    normal_values: list[np.ndarray] = []
    for amap, mask in pairs:
        normal_values.append(amap[~mask])
        if mask.any():
            labelled, n_regions = ndimage.label(mask, structure=structure)
            for k in range(1, n_regions + 1):
                regions.append(np.sort(amap[labelled == k]))
    normal = np.sort(np.concatenate(normal_values)) if normal_values else np.empty(0)
    if not regions or normal.size == 0:
        return None
    lo = min(float(normal[0]), min(float(r[0]) for r in regions))
    hi = max(float(normal[-1]), max(float(r[-1]) for r in regions))
    thresholds = np.linspace(hi, lo, n_thresholds)  # descending: fpr and pro grow along it

    def share_at_least(sorted_values: np.ndarray) -> np.ndarray:
        # share of values >= t for every threshold t
        below = np.searchsorted(sorted_values, thresholds, side="left")
        return (sorted_values.size - below) / sorted_values.size

    fpr = share_at_least(normal)
    pro = np.mean([share_at_least(r) for r in regions], axis=0)
    # a threshold above every value: nothing predicted, the curve starts at (0, 0)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    return fpr, pro


def aupro(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    *,
    fpr_limit: float = AUPRO_FPR_LIMIT,
    n_thresholds: int = 200,
) -> float | None:
    """Area under the PRO curve (``pro_curve``) for FPR in [0, ``fpr_limit``], divided by ``fpr_limit``.

    The curve is integrated with the trapezoid rule and linearly interpolated at ``fpr_limit``, so a
    perfect map scores 1.0 and a constant map (every pixel tied) scores ``fpr_limit / 2`` (the
    chance diagonal). ``None`` when there is no defect region or no non-defect pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise InvalidInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(maps, masks, n_thresholds=n_thresholds)
    if curve is None:
        return None
    fpr, pro = curve
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        j = int(np.argmax(fpr > fpr_limit))  # first point past the limit (exists: fpr ends at 1)
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / fpr_limit


# --------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class EvaluationReport:
    """Metrics of one model on one evaluation split.

    ``overall``: image_auroc, pixel_auroc, aupro, f1, precision, recall, false_reject_rate,
    escape_rate, threshold, n_ok, n_ng. ``per_class``: for every defect class, image_auroc (that class
    vs good), recall (share of the class called NG at the threshold) and n; with maps and masks also pixel_auroc
    and aupro (that class's pixels with the good images').
    """

    overall: dict[str, float | int | None]
    per_class: dict[str, dict[str, float | int | None]]
    roc: list[dict[str, float | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.overall, "per_class": {k: dict(v) for k, v in self.per_class.items()}}

    def flat_metrics(self, *, prefix: str = "") -> dict[str, float]:
        """Finite numeric metrics as ``{name: value}`` (per class as ``<class>.<name>``), for MLflow."""
        out: dict[str, float] = {}
        for key, value in self.overall.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{prefix}{key}"] = float(value)
        for cls, values in self.per_class.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out[f"{prefix}{cls}.{key}"] = float(value)
        return out


def pixel_figures(
    labels: Values,
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    indices: Iterable[int],
    *,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> tuple[float | None, float | None]:
    """Pixel AUROC and AUPRO of the images ``indices`` whose mask is known: OK images (mask ``None`` = no defect
    pixel) and NG images with a mask (an NG image without one is left out); ``(None, None)`` when no image with a
    mask is among them."""
    y = np.asarray(labels)
    known = [int(i) for i in indices if masks[int(i)] is not None or y[int(i)] == 0]
    if not any(masks[i] is not None for i in known):
        return None, None
    sel_maps, sel_masks = [maps[i] for i in known], [masks[i] for i in known]
    return pixel_auroc(sel_maps, sel_masks), aupro(sel_maps, sel_masks, fpr_limit=fpr_limit)


def evaluate_scores(
    *,
    labels: Values,
    scores: Values,
    threshold: float,
    defect_classes: Sequence[str] | None = None,
    maps: Sequence[np.ndarray] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> EvaluationReport:
    """Image metrics, pixel metrics (when ``maps`` and ``masks`` are given) and per-class metrics.

    ``defect_classes[i]`` names the class of sample ``i`` (``"good"`` for OK samples); without it NG
    samples form one class ``"ng"``. Pixel AUROC/AUPRO use only the images whose mask is known: OK
    images (mask ``None`` = no defect pixel) and NG images with a mask; NG images without a mask are
    left out of the pixel metrics.
    """
    y, s = _labels_scores(labels, scores)
    classes = (
        [str(c) for c in defect_classes]
        if defect_classes is not None
        else [GOOD_CLASS if v == 0 else "ng" for v in y]
    )
    if len(classes) != y.size:
        raise InvalidInputError("defect_classes must have one entry per score")
    rates = rates_at(y, s, threshold)
    pix_auroc: float | None = None
    pro: float | None = None
    if maps is not None and masks is not None:
        if len(maps) != y.size or len(masks) != y.size:
            raise InvalidInputError("maps and masks must have one entry per score")
        pix_auroc, pro = pixel_figures(y, maps, masks, range(y.size), fpr_limit=fpr_limit)
    overall: dict[str, float | int | None] = {
        "image_auroc": image_auroc(y, s),
        "pixel_auroc": pix_auroc,
        "aupro": pro,
        "f1": rates.f1,
        "precision": rates.precision,
        "recall": rates.recall,
        "false_reject_rate": rates.false_reject_rate,
        "escape_rate": rates.escape_rate,
        "threshold": float(threshold),
        "n_ok": int(np.sum(y == 0)),
        "n_ng": int(np.sum(y == 1)),
    }
    per_class: dict[str, dict[str, float | int | None]] = {}
    cls_arr = np.asarray(classes, dtype=object)
    good = y == 0
    for cls in sorted({c for c, v in zip(classes, y, strict=True) if v == 1}):
        sel = (cls_arr == cls) & (y == 1)
        pair = good | sel
        per_class[cls] = {
            "image_auroc": image_auroc(y[pair], s[pair]),
            "recall": float(np.mean(s[sel] >= threshold)),
            "n": int(sel.sum()),
        }
        if pix_auroc is not None and maps is not None and masks is not None:
            # one class's pixels pooled with the good images': which defects the maps find, and which they miss
            class_auroc, class_pro = pixel_figures(y, maps, masks, np.flatnonzero(pair), fpr_limit=fpr_limit)
            if class_auroc is not None:
                per_class[cls]["pixel_auroc"], per_class[cls]["aupro"] = class_auroc, class_pro
    return EvaluationReport(overall=overall, per_class=per_class, roc=roc_points(y, s))


# --------------------------------------------------------------------------------------------- plot data


def histogram_bins(values: Sequence[float], *, n_bins: int = 30) -> np.ndarray:
    """``(n_bins + 1,)`` shared bin edges covering every value (a unit range around a constant)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return np.linspace(0.0, 1.0, n_bins + 1)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def score_histogram(
    ok: Sequence[float], ng: Sequence[float], *, n_bins: int = 30
) -> list[dict[str, float | int]]:
    """Histogram rows ``{"bin_lo", "bin_hi", "bin_center", "ok", "ng"}`` on shared edges (plot data)."""
    edges = histogram_bins([*ok, *ng], n_bins=n_bins)
    ok_counts, _ = np.histogram(np.asarray(ok, dtype=np.float64), bins=edges)
    ng_counts, _ = np.histogram(np.asarray(ng, dtype=np.float64), bins=edges)
    return [
        {"bin_lo": float(edges[i]), "bin_hi": float(edges[i + 1]),
         "bin_center": float((edges[i] + edges[i + 1]) / 2), "ok": int(ok_counts[i]), "ng": int(ng_counts[i])}
        for i in range(n_bins)
    ]
