"""Evaluation metrics and plots for anomaly detection: image/pixel AUROC, AUPRO, F1, error rates.

Conventions: a *label* is 1 for NG (defective) and 0 for OK; a *score* is higher for more anomalous;
the decision at a threshold is NG when ``score >= threshold`` (as ``service.decide``). Anomaly maps
are ``(H, W)`` float arrays, ground-truth masks ``(H, W)`` arrays where a non-zero value marks a defect
pixel (binarise grey masks first with ``binarize_mask``). A metric that is undefined for the data
(one class absent, no defect pixel) is ``None``, never a made-up number.

Only NumPy is imported at module import time; scikit-learn, SciPy and matplotlib (Agg backend)
are imported lazily by the functions that need them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from .errors import InvalidInputError

GOOD_CLASS = "good"

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


def binarize_mask(mask: np.ndarray, *, threshold: int = 127) -> np.ndarray:
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
    fpr_limit: float = 0.3,
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
    vs good), recall (share of the class called NG at the threshold) and n.
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


def evaluate_scores(
    *,
    labels: Values,
    scores: Values,
    threshold: float,
    defect_classes: Sequence[str] | None = None,
    maps: Sequence[np.ndarray] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    fpr_limit: float = 0.3,
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
        known = [i for i in range(y.size) if masks[i] is not None or y[i] == 0]
        if any(masks[i] is not None for i in known):
            sel_maps = [maps[i] for i in known]
            sel_masks = [masks[i] for i in known]
            pix_auroc = pixel_auroc(sel_maps, sel_masks)
            pro = aupro(sel_maps, sel_masks, fpr_limit=fpr_limit)
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
    return EvaluationReport(overall=overall, per_class=per_class, roc=roc_points(y, s))


# --------------------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_roc(points: Sequence[Mapping[str, Any]], path: Path, *, title: str = "ROC") -> Path:
    """Write the ROC curve (``roc_points`` output) as a PNG; the chance diagonal is dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if points:
        ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], color="C0", linewidth=2)
    else:
        ax.text(0.5, 0.5, "undefined (one class only)", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=title)
    return _save(fig, path)


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


def plot_score_histogram(
    ok: Sequence[float], ng: Sequence[float], threshold: float | None, path: Path, *, title: str = "Scores"
) -> Path:
    """Write overlaid OK/NG score histograms with a vertical line at the threshold as a PNG."""
    plt = _pyplot()
    values = [*ok, *ng] + ([threshold] if threshold is not None else [])
    edges = histogram_bins(values)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(list(ok), bins=edges, alpha=0.6, color="C2", label=f"OK (n={len(ok)})")
    ax.hist(list(ng), bins=edges, alpha=0.6, color="C3", label=f"NG (n={len(ng)})")
    if threshold is not None:
        ax.axvline(float(threshold), color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="score", ylabel="images", title=title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    return arr[..., ::-1]  # BGR (OpenCV order, as bdi.imaging decodes) -> RGB


def plot_gallery(
    images: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path,
    *,
    columns: int = 4,
    vmax: float | None = None,
) -> Path:
    """Write a grid of heatmap overlays (BGR image + anomaly map in ``jet``, alpha 0.5) as a PNG.

    ``images[i]`` is ``(H, W, 3)`` BGR uint8 (or ``(H, W)`` grey) and ``maps[i]`` its ``(H, W)`` map; all
    maps share one colour scale (``0..vmax``, default the largest map value) so panels compare.
    """
    if not (len(images) == len(maps) == len(titles)):
        raise InvalidInputError("images, maps and titles must have the same length")
    plt = _pyplot()
    n = max(1, len(images))
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    top = vmax if vmax is not None else max((float(np.max(m)) for m in maps), default=1.0)
    top = top if top > 0 else 1.0
    for ax in axes.ravel():
        ax.axis("off")
    if not images:
        axes[0][0].text(0.5, 0.5, "no images", ha="center", va="center")
    for ax, image, amap, title in zip(axes.ravel(), images, maps, titles, strict=False):
        rgb = _to_rgb(image)
        extent = (-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5)  # the map covers the image
        ax.imshow(rgb, extent=extent)
        ax.imshow(np.asarray(amap, dtype=np.float32), cmap="jet", alpha=0.5, vmin=0.0, vmax=top,
                  extent=extent)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
