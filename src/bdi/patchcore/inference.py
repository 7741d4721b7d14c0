"""Patch distances → anomaly map → score, heatmap and regions (docs/contract.md "Inference pipeline").

Pure array code: no storage, no HTTP. The one deliberate difference from the legacy backend
(docs/design.md "Heatmap aligned with the crop") is that letterbox padding is cut away before the map is resized to the
crop, so non-square crops are not distorted; ``ScoringConfig.remove_letterbox=False`` restores the
legacy geometry. Region areas are pixel counts of connected components, not ``cv2.contourArea``
(which gives 0 for a one-pixel blob).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np

from bdi.config import ScoringConfig
from bdi.errors import TokenGridMismatchError
from bdi.patchcore.imaging import Letterbox
from bdi.patchcore.knn import KnnIndex
from bdi.patchcore.memory import l2_normalize

Offset = tuple[float, float]  # how far (down, right) in network input px a token's features sit from its cell's centre
NO_OFFSET: Offset = (0.0, 0.0)


@dataclass(frozen=True)
class Region:
    """A connected defect region in crop pixel coordinates."""

    bbox: tuple[int, int, int, int]  # x, y, w, h
    area_px: float
    area_mm2: float
    contour: list[list[int]]  # [[x, y], ...] outer boundary


@dataclass(frozen=True)
class InferenceResult:
    """What scoring one crop produced.

    Attributes:
        score: percentile of ``anomaly_map`` inside the mask, or with ``score_top_k`` the mean of the k largest
            patch scores (0.0 for an empty mask).
        anomaly_map: (H, W) float32 blurred patch distances in crop pixels; with ``self_contrast`` sharpened by
            the part's contrast with itself, its score percentile unchanged.
        mask: (H, W) uint8 ROI mask (0..255, anti-aliased edges count as inside).
        regions: sorted by area_px descending; empty when no threshold was given.
        timings_ms: per-stage wall times.
    """

    score: float
    token_shape: tuple[int, int]
    anomaly_map: np.ndarray
    mask: np.ndarray
    regions: list[Region] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def heatmap_u8(self) -> np.ndarray:
        return heatmap_u8(self.anomaly_map, self.mask)


class StageTimer:
    """Collects per-stage wall times in milliseconds."""

    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_ms[name] = self.timings_ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


def patch_distances(index: KnnIndex, embeddings: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """1-NN Euclidean distance of each query row, L2-normalised first when ``normalize`` (then in [0, 2]).
    (Q, D) → (Q,) float32."""
    queries = l2_normalize(embeddings) if normalize else np.ascontiguousarray(embeddings, dtype=np.float32)
    squared, _ = index.search(queries, k=1)
    distances: np.ndarray = np.sqrt(np.maximum(squared[:, 0], 0.0)).astype(np.float32)
    return distances


def shift_canvas(canvas: np.ndarray, offset: Offset, *, scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``canvas`` moved ``offset`` (× ``scale``, canvas px per input px down and across) up and to the left:
    ``out[p] = canvas[p + offset]``, edges repeated (``bdi.patchcore.alignment``)."""
    down, right = offset[0] * scale[0], offset[1] * scale[1]
    if not down and not right:
        return canvas
    matrix = np.array([[1, 0, right], [0, 1, down]], dtype=np.float32)
    height, width = canvas.shape[:2]
    shifted: np.ndarray = cv2.warpAffine(canvas, matrix, (width, height),
                                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return shifted


def distance_map(
    distances: np.ndarray, *, grid: tuple[int, int], letterbox: Letterbox, remove_letterbox: bool,
    offset: Offset = NO_OFFSET,
) -> np.ndarray:
    """Token distances (Ht·Wt,) → (H, W) float32 map aligned with the original crop.

    With ``remove_letterbox`` the token map is upsampled to the letterbox canvas, the padding is cut
    away and the content is resized to the crop; otherwise the grid is stretched over the crop. Either way the
    map is drawn ``offset`` input px up and to the left, where the features sit (``bdi.patchcore.alignment``).
    """
    token_map = distances.reshape(grid).astype(np.float32)
    size = (letterbox.src_w, letterbox.src_h)
    if not remove_letterbox:
        stretched = cv2.resize(token_map, size, interpolation=cv2.INTER_LINEAR)
        return shift_canvas(stretched, offset, scale=(letterbox.src_h / letterbox.size,
                                                      letterbox.src_w / letterbox.size))
    canvas = shift_canvas(cv2.resize(token_map, (letterbox.size, letterbox.size), interpolation=cv2.INTER_LINEAR),
                          offset)
    content = canvas[
        letterbox.pad_top : letterbox.pad_top + letterbox.new_h,
        letterbox.pad_left : letterbox.pad_left + letterbox.new_w,
    ]
    return cv2.resize(content, size, interpolation=cv2.INTER_LINEAR)


def gaussian_blur(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with kernel size max(3, 2·round(3σ)+1) (7×7 for σ = 1); σ = 0 is the identity."""
    if sigma <= 0:
        return anomaly_map
    ksize = max(3, 2 * round(3 * sigma) + 1)
    return cv2.GaussianBlur(anomaly_map, (ksize, ksize), sigmaX=sigma, sigmaY=sigma)


def masked_score(anomaly_map: np.ndarray, mask: np.ndarray, percentile: float) -> float:
    """Linear-interpolated percentile of the map where mask > 0; 0.0 for an empty mask."""
    valid = anomaly_map[mask > 0]
    if valid.size == 0:
        return 0.0
    return float(np.percentile(valid, percentile))


def top_k_mean(values: np.ndarray, k: int) -> float:
    """The mean of the ``k`` largest values (all of them when fewer); 0.0 for none. (N,) → float."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return 0.0
    k = min(k, flat.size)
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def _token_centres(
    *, grid: tuple[int, int], letterbox: Letterbox, remove_letterbox: bool, offset: Offset
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Crop pixel row of each token row and column of each token column (floats, possibly off the crop), as
    :func:`distance_map` places the token grid, and which of them fall on the crop: (Ht,), (Wt,), (Ht,) bool,
    (Wt,) bool."""
    rows, cols = (np.arange(n, dtype=np.float64) + 0.5 for n in grid)
    down, right = offset
    if remove_letterbox:
        ys = (rows * letterbox.size / grid[0] - down - letterbox.pad_top) * letterbox.src_h / letterbox.new_h
        xs = (cols * letterbox.size / grid[1] - right - letterbox.pad_left) * letterbox.src_w / letterbox.new_w
    else:
        ys = (rows * letterbox.size / grid[0] - down) * letterbox.src_h / letterbox.size
        xs = (cols * letterbox.size / grid[1] - right) * letterbox.src_w / letterbox.size
    return ys, xs, (ys >= 0) & (ys < letterbox.src_h), (xs >= 0) & (xs < letterbox.src_w)


def patch_centres(
    *, grid: tuple[int, int], letterbox: Letterbox, remove_letterbox: bool, offset: Offset = NO_OFFSET
) -> tuple[np.ndarray, np.ndarray]:
    """Crop pixel (row, col) of each patch centre that falls on the crop (padding patches left out), as
    :func:`distance_map` places the token grid: (n,) int arrays each."""
    ys, xs, on_rows, on_cols = _token_centres(grid=grid, letterbox=letterbox, remove_letterbox=remove_letterbox,
                                              offset=offset)
    ys, xs = ys[on_rows], xs[on_cols]
    yy, xx = np.meshgrid(np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64), indexing="ij")
    return yy.ravel(), xx.ravel()


def part_tokens(
    *, grid: tuple[int, int], letterbox: Letterbox, remove_letterbox: bool, mask: np.ndarray,
    offset: Offset = NO_OFFSET,
) -> np.ndarray:
    """Which tokens show the part: their centres on the crop and inside ``mask``. (Ht·Wt,) bool."""
    ys, xs, on_rows, on_cols = _token_centres(grid=grid, letterbox=letterbox, remove_letterbox=remove_letterbox,
                                              offset=offset)
    rows = np.clip(np.floor(ys), 0, letterbox.src_h - 1).astype(np.int64)
    cols = np.clip(np.floor(xs), 0, letterbox.src_w - 1).astype(np.int64)
    inside = mask[np.ix_(rows, cols)] > 0
    part: np.ndarray = (inside & on_rows[:, None] & on_cols[None, :]).ravel()
    return part


SELF_CONTRAST_CLIP = 10.0  # a z-score beyond this is noise of a nearly uniform part, not more evidence


def self_contrast(embeddings: np.ndarray, part: np.ndarray) -> np.ndarray:
    """How much each token differs from the rest of its own part: the distance of its L2-normalised embedding
    to the part tokens' median embedding, as a z-score over the part tokens (clipped to ±10).
    (Q, D), (Q,) bool → (Q,) float32; zeros when fewer than two tokens show the part."""
    if int(part.sum()) < 2:
        return np.zeros(embeddings.shape[0], dtype=np.float32)
    directions = l2_normalize(embeddings)
    distances = np.linalg.norm(directions - np.median(directions[part], axis=0), axis=1)
    on_part = distances[part]
    z = (distances - np.median(on_part)) / (on_part.std() + 1e-6)
    contrast: np.ndarray = np.clip(z, -SELF_CONTRAST_CLIP, SELF_CONTRAST_CLIP).astype(np.float32)
    return contrast


def sharpen_by_self_contrast(
    anomaly_map: np.ndarray, contrast_map: np.ndarray, *, weight: float, mask: np.ndarray, percentile: float
) -> np.ndarray:
    """``anomaly_map · exp(weight · contrast_map)``, rescaled so its ``percentile`` inside ``mask`` is the
    anomaly map's (the image score): the peak keeps its value, so a region still needs a score at the
    threshold, while what looks like the rest of the part is turned down and what stands out of it is
    kept (``ScoringConfig.self_contrast``)."""
    sharpened = anomaly_map * np.exp(weight * contrast_map)
    before, after = masked_score(anomaly_map, mask, percentile), masked_score(sharpened, mask, percentile)
    if before <= 0 or after <= 0:
        return anomaly_map
    out: np.ndarray = (sharpened * (before / after)).astype(np.float32)
    return out


def top_k_score(
    anomaly_map: np.ndarray, mask: np.ndarray, *, k: int, grid: tuple[int, int], letterbox: Letterbox,
    remove_letterbox: bool, offset: Offset = NO_OFFSET,
) -> float:
    """The image score as the mean of the ``k`` largest patch scores: the (blurred) map at the patch centres that
    lie inside the mask (``ScoringConfig.score_top_k``); 0.0 when none does."""
    ys, xs = patch_centres(grid=grid, letterbox=letterbox, remove_letterbox=remove_letterbox, offset=offset)
    inside = mask[ys, xs] > 0
    return top_k_mean(anomaly_map[ys[inside], xs[inside]], k)


def heatmap_u8(anomaly_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image display heatmap (the pipeline's step 7): 1st–99th percentile stretch, 0 outside mask."""
    inside = mask > 0
    out = np.zeros(anomaly_map.shape, dtype=np.uint8)
    valid = anomaly_map[inside]
    if valid.size == 0:
        return out
    lo, hi = np.percentile(valid, [1, 99])
    if hi <= lo:
        return out
    scaled = np.clip((anomaly_map - lo) / (hi - lo), 0.0, 1.0)
    out[inside] = np.floor(scaled[inside] * 255.0 + 0.5).astype(np.uint8)
    return out


def find_regions(
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    *,
    threshold: float,
    mm_per_px: float,
    area_mm2_thr: float,
) -> list[Region]:
    """Connected components of (mask ∧ map ≥ threshold) with area ≥ area_mm2_thr, largest first."""
    binary = ((mask > 0) & (anomaly_map >= threshold)).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    mm2_per_px = mm_per_px * mm_per_px
    min_area_px = area_mm2_thr / mm2_per_px if mm2_per_px > 0 else 0.0
    regions: list[Region] = []
    for label in range(1, n_labels):
        area_px = float(stats[label, cv2.CC_STAT_AREA])
        if area_px < min_area_px:
            continue
        x, y, w, h = (int(v) for v in stats[label, :4])
        component = (labels[y : y + h, x : x + w] == label).astype(np.uint8)
        contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = max(contours, key=len)
        regions.append(
            Region(
                bbox=(x, y, w, h),
                area_px=area_px,
                area_mm2=area_px * mm2_per_px,
                contour=[[int(px) + x, int(py) + y] for px, py in outline.reshape(-1, 2)],
            )
        )
    regions.sort(key=lambda r: r.area_px, reverse=True)
    return regions


def score_crop(
    *,
    embeddings: np.ndarray,
    grid: tuple[int, int],
    letterbox: Letterbox,
    index: KnnIndex,
    memory_grid: tuple[int, int],
    mask: np.ndarray,
    cfg: ScoringConfig,
    threshold: float | None,
    mm_per_px: float,
    timer: StageTimer | None = None,
    normalize: bool = True,
    offset: Offset = NO_OFFSET,
) -> InferenceResult:
    """Score one crop's patch embeddings against a memory.

    Args:
        embeddings: (Ht·Wt, D) float32 raw patch embeddings of the crop.
        grid: (Ht, Wt) of the embeddings; must equal ``memory_grid``.
        mask: (H, W) uint8 ROI mask in crop pixels.
        threshold: the calibrated threshold; regions are computed only when given.
        offset: where the features sit from their cells' centres (the memory's, ``bdi.patchcore.alignment``).
    """
    timer = timer or StageTimer()
    if cfg.blur_sigma is None or cfg.score_percentile is None:
        raise ValueError("score_crop needs a resolved ScoringConfig (ScoringConfig.resolved(backbone))")
    if tuple(grid) != tuple(memory_grid):
        raise TokenGridMismatchError(got=grid, expected=memory_grid)
    with timer.stage("search"):  # the 1-NN (kNN) search
        distances = patch_distances(index, embeddings, normalize=normalize)
    with timer.stage("map"):
        upsampled = distance_map(distances, grid=grid, letterbox=letterbox, remove_letterbox=cfg.remove_letterbox,
                                 offset=offset)
    with timer.stage("blur"):
        anomaly_map = gaussian_blur(upsampled, cfg.blur_sigma)
    with timer.stage("score"):
        if cfg.score_top_k > 0:
            score = top_k_score(anomaly_map, mask, k=cfg.score_top_k, grid=grid, letterbox=letterbox,
                                remove_letterbox=cfg.remove_letterbox, offset=offset)
        else:
            score = masked_score(anomaly_map, mask, cfg.score_percentile)
    if cfg.self_contrast:
        with timer.stage("contrast"):  # the map's shape only: the score above is the nearest distances'
            part = part_tokens(grid=grid, letterbox=letterbox, remove_letterbox=cfg.remove_letterbox, mask=mask,
                               offset=offset)
            contrast = gaussian_blur(distance_map(self_contrast(embeddings, part), grid=grid, letterbox=letterbox,
                                                  remove_letterbox=cfg.remove_letterbox, offset=offset),
                                     cfg.blur_sigma)
            anomaly_map = sharpen_by_self_contrast(anomaly_map, contrast, weight=cfg.self_contrast, mask=mask,
                                                   percentile=cfg.score_percentile)
    regions: list[Region] = []
    if threshold is not None:
        with timer.stage("regions"):
            regions = find_regions(
                anomaly_map, mask, threshold=threshold, mm_per_px=mm_per_px, area_mm2_thr=cfg.area_mm2_thr
            )
    return InferenceResult(
        score=score,
        token_shape=(int(grid[0]), int(grid[1])),
        anomaly_map=anomaly_map,
        mask=mask,
        regions=regions,
        timings_ms=dict(timer.timings_ms),
    )
