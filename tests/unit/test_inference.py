from __future__ import annotations

import numpy as np
import pytest

from bdi.config import ScoringConfig
from bdi.errors import TokenGridMismatchError
from bdi.patchcore.imaging import build_roi_mask, letterbox_geometry
from bdi.patchcore.inference import (
    distance_map,
    find_regions,
    gaussian_blur,
    heatmap_u8,
    masked_score,
    part_tokens,
    patch_centres,
    patch_distances,
    score_crop,
    self_contrast,
    top_k_mean,
)
from bdi.patchcore.knn import KnnIndex
from bdi.patchcore.memory import l2_normalize

SCORING = ScoringConfig(blur_sigma=1.0, score_percentile=99)


def test_gaussian_blur_sigma_one_uses_seven_tap_kernel() -> None:
    impulse = np.zeros((15, 15), dtype=np.float32)
    impulse[7, 7] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert np.count_nonzero(blurred[7]) == 7  # support = 7 px wide
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5)


def test_masked_score_is_percentile_inside_mask_and_zero_for_empty_mask() -> None:
    values = np.arange(100, dtype=np.float32).reshape(10, 10)
    mask = np.zeros((10, 10), np.uint8)
    assert masked_score(values, mask, 99) == 0.0
    mask[:5] = 255
    assert masked_score(values, mask, 50) == pytest.approx(np.percentile(np.arange(50), 50))


def test_heatmap_is_zero_outside_mask_and_stretched_inside() -> None:
    values = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    mask = build_roi_mask({"kind": "circle", "cx": 10, "cy": 10, "r": 6}, width=20, height=20)
    heat = heatmap_u8(values, mask)
    assert heat.dtype == np.uint8
    assert heat[mask == 0].max() == 0
    assert heat[mask > 0].max() == 255


def test_regions_report_pixel_area_in_mm2_for_a_known_square_defect() -> None:
    anomaly = np.zeros((60, 80), dtype=np.float32)
    anomaly[10:20, 30:45] = 1.0  # 10 x 15 = 150 px
    anomaly[40:42, 5:7] = 1.0  # 4 px: below the area threshold
    mask = np.full((60, 80), 255, np.uint8)
    regions = find_regions(anomaly, mask, threshold=0.5, mm_per_px=0.2, area_mm2_thr=1.0)
    assert len(regions) == 1
    region = regions[0]
    assert region.bbox == (30, 10, 15, 10)
    assert region.area_px == 150
    assert region.area_mm2 == pytest.approx(150 * 0.04)


def test_regions_are_sorted_by_area_descending() -> None:
    anomaly = np.zeros((50, 50), dtype=np.float32)
    anomaly[0:3, 0:3] = 1
    anomaly[20:30, 20:30] = 1
    regions = find_regions(anomaly, np.full((50, 50), 255, np.uint8), threshold=0.5, mm_per_px=1, area_mm2_thr=0)
    assert [r.area_px for r in regions] == [100, 9]


def test_distance_map_removes_letterbox_padding_for_wide_crops() -> None:
    # A 4x4 grid over a 56 px canvas; a 112x56 crop occupies canvas rows 14..42 (pad 14 top/bottom).
    geometry = letterbox_geometry(src_w=112, src_h=56, size=56)
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[0, :] = grid[3, :] = 9.0  # padding rows only
    aligned = distance_map(grid.ravel(), grid=(4, 4), letterbox=geometry, remove_letterbox=True)
    legacy = distance_map(grid.ravel(), grid=(4, 4), letterbox=geometry, remove_letterbox=False)
    assert aligned.shape == legacy.shape == (56, 112)
    assert aligned[28, :].max() < 1.0  # the centre of the crop is not painted by padding tokens
    assert legacy[0, :].min() == pytest.approx(9.0)  # legacy stretches padding over the crop


def test_score_crop_rejects_token_grid_mismatch() -> None:
    index = KnnIndex.build(l2_normalize(np.eye(4, dtype=np.float32)))
    with pytest.raises(TokenGridMismatchError, match=r"got \(2, 2\), expected \(3, 3\)"):
        score_crop(
            embeddings=np.eye(4, dtype=np.float32), grid=(2, 2),
            letterbox=letterbox_geometry(src_w=28, src_h=28, size=28), index=index, memory_grid=(3, 3),
            mask=np.full((28, 28), 255, np.uint8), cfg=SCORING, threshold=None, mm_per_px=1.0,
        )


def test_score_crop_distances_lie_in_zero_two_and_match_memory_exactly() -> None:
    rows = l2_normalize(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    index = KnnIndex.build(rows)
    result = score_crop(
        embeddings=rows, grid=(2, 2), letterbox=letterbox_geometry(src_w=28, src_h=28, size=28),
        index=index, memory_grid=(2, 2), mask=np.full((28, 28), 255, np.uint8), cfg=SCORING,
        threshold=0.5, mm_per_px=0.1,
    )
    assert result.score == pytest.approx(0.0, abs=1e-3)
    assert result.regions == []
    assert {"search", "map", "blur", "score", "regions"} <= set(result.timings_ms)


def test_top_k_mean_is_the_mean_of_the_k_largest_values() -> None:
    values = np.array([0.1, 0.9, 0.3, 0.7, 0.5], dtype=np.float32)
    assert top_k_mean(values, 2) == pytest.approx((0.9 + 0.7) / 2)
    assert top_k_mean(values, 1) == pytest.approx(0.9)
    assert top_k_mean(values, 10) == pytest.approx(values.mean())  # fewer values than k: all of them
    assert top_k_mean(np.array([], dtype=np.float32), 3) == 0.0


def test_score_crop_with_top_k_scores_the_mean_of_the_k_largest_patch_scores_inside_the_mask() -> None:
    # one pixel per patch (a 4x4 crop on a 4x4 grid) and no blur: the patch scores are the 1-NN distances
    rng = np.random.default_rng(0)
    memory = l2_normalize(rng.standard_normal((4, 8)).astype(np.float32))
    queries = l2_normalize(rng.standard_normal((16, 8)).astype(np.float32))
    distances = patch_distances(KnnIndex.build(memory), queries)
    mask = np.full((4, 4), 255, np.uint8)
    mask[:, 0] = 0  # the first column of patches is outside the ROI
    inside = distances.reshape(4, 4)[:, 1:].ravel()
    cfg = ScoringConfig(score_percentile=100, blur_sigma=0.0, score_top_k=3)
    result = score_crop(
        embeddings=queries, grid=(4, 4), letterbox=letterbox_geometry(src_w=4, src_h=4, size=4),
        index=KnnIndex.build(memory), memory_grid=(4, 4), mask=mask, cfg=cfg, threshold=None, mm_per_px=1.0,
    )
    assert result.score == pytest.approx(float(np.sort(inside)[-3:].mean()), rel=1e-6)
    assert result.score < float(inside.max())  # not the maximum, which k = 0 (the percentile rule) gives


def test_patch_centres_leave_out_letterbox_padding() -> None:
    # a 112x56 crop on a 56 px canvas with a 4x4 grid: rows 0 and 3 are padding, rows 1 and 2 fall on the crop
    geometry = letterbox_geometry(src_w=112, src_h=56, size=56)
    ys, xs = patch_centres(grid=(4, 4), letterbox=geometry, remove_letterbox=True)
    assert len(ys) == len(xs) == 2 * 4
    assert set(ys.tolist()) == {14, 42}  # canvas rows 21 and 35 minus the 14 px pad, times 2
    assert set(xs.tolist()) == {14, 42, 70, 98}


def _part_with_one_odd_patch() -> tuple[np.ndarray, np.ndarray]:
    """A memory and a 4x4 grid of patches: 15 alike (one direction, all at one distance from the memory) and one
    (row 2, col 1) unlike them and further from the memory."""
    memory = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    patches = np.tile(np.array([[0.8, 0.6, 0.0]], dtype=np.float32), (16, 1))
    patches[9] = [0.0, 0.0, 1.0]
    return memory, patches


def _score_part(memory: np.ndarray, patches: np.ndarray, *, weight: float, threshold: float | None = None):
    cfg = ScoringConfig(score_percentile=100, blur_sigma=0.0, self_contrast=weight)
    return score_crop(embeddings=patches, grid=(4, 4), letterbox=letterbox_geometry(src_w=4, src_h=4, size=4),
                      index=KnnIndex.build(memory), memory_grid=(4, 4), mask=np.full((4, 4), 255, np.uint8),
                      cfg=cfg, threshold=threshold, mm_per_px=1.0)


def test_self_contrast_turns_down_what_looks_like_the_rest_of_the_part_and_keeps_the_score() -> None:
    memory, patches = _part_with_one_odd_patch()
    plain, sharpened = _score_part(memory, patches, weight=0.0), _score_part(memory, patches, weight=0.15)
    alike, odd = np.ones((4, 4), bool), (2, 1)
    alike[odd] = False
    assert plain.anomaly_map[alike] == pytest.approx(np.hypot(0.2, 0.6), abs=1e-5)  # weight 0: the 1-NN distances
    assert sharpened.score == pytest.approx(plain.score) == pytest.approx(np.sqrt(2.0), abs=1e-5)
    assert sharpened.anomaly_map[odd] == pytest.approx(plain.anomaly_map[odd])  # the peak keeps the score
    # the patches like the rest of their part are turned down, relative to the peak and absolutely
    assert np.all(sharpened.anomaly_map[alike] < 0.9 * plain.anomaly_map[alike])


def test_self_contrast_leaves_regions_only_where_the_score_reaches_the_threshold() -> None:
    memory, patches = _part_with_one_odd_patch()
    below = _score_part(memory, patches, weight=0.15, threshold=1.5)  # the score, sqrt(2), is under it
    assert below.score < 1.5 and below.regions == [] and float(below.anomaly_map.max()) < 1.5
    at = _score_part(memory, patches, weight=0.15, threshold=1.0)
    assert [region.area_px for region in at.regions] == [1.0]  # only the odd patch: the alike ones turned down
    assert [region.area_px for region in _score_part(memory, patches, weight=0.0, threshold=0.6).regions] == [16.0]


def test_self_contrast_is_zero_for_a_uniform_part_and_for_a_part_of_one_patch() -> None:
    uniform = np.tile(np.array([[0.8, 0.6, 0.0]], dtype=np.float32), (16, 1))
    assert np.all(self_contrast(uniform, np.ones(16, bool)) == 0.0)
    _, patches = _part_with_one_odd_patch()
    single = np.zeros(16, bool)
    single[9] = True
    assert np.all(self_contrast(patches, single) == 0.0)
    z = self_contrast(patches, np.ones(16, bool))
    assert z[9] == z.max() > 3.0 and np.all(z[np.arange(16) != 9] <= 0.0)


def test_part_tokens_leave_out_letterbox_padding_and_patches_outside_the_mask() -> None:
    # a 112x56 crop on a 56 px canvas with a 4x4 grid: rows 0 and 3 are padding; the mask drops the left half
    geometry = letterbox_geometry(src_w=112, src_h=56, size=56)
    mask = np.full((56, 112), 255, np.uint8)
    mask[:, :56] = 0
    part = part_tokens(grid=(4, 4), letterbox=geometry, remove_letterbox=True, mask=mask).reshape(4, 4)
    expected = np.zeros((4, 4), bool)
    expected[1:3, 2:] = True
    assert np.array_equal(part, expected)
