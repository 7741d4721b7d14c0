"""PNG plots of an evaluation: ROC curve, OK/NG score histograms with the threshold, heatmap galleries.

matplotlib (the ``plots`` extra) is imported lazily, with the Agg backend, by the functions that draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bdi.data.metrics import histogram_bins
from bdi.errors import InvalidInputError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: install the 'plots' extra (pip install 'bdi[plots]')") from exc

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
    return arr[..., ::-1]  # BGR (OpenCV order, as bdi.patchcore.imaging decodes) -> RGB


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
