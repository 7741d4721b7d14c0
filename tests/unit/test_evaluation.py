"""bdi.data.metrics: known answers for AUROC, AUPRO, F1 and rates; plots are written as PNGs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bdi.data.metrics import (
    aupro,
    binarize_mask,
    evaluate_scores,
    f1_at,
    image_auroc,
    pixel_auroc,
    pro_curve,
    rates_at,
    roc_points,
    score_histogram,
)
from bdi.data.plots import plot_gallery, plot_roc, plot_score_histogram
from bdi.errors import InvalidInputError


def _square_mask(size: int = 32, *, lo: int = 8, hi: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[lo:hi, lo:hi] = 255
    return mask


# ------------------------------------------------------------------ image AUROC / ROC


def test_image_auroc_perfect_separation_is_one() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)


def test_image_auroc_inverted_scores_is_zero() -> None:
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)


def test_image_auroc_ties_count_half() -> None:
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_image_auroc_single_class_is_none(labels: list[int]) -> None:
    assert image_auroc(labels, [0.1] * len(labels)) is None


def test_image_auroc_rejects_bad_labels() -> None:
    with pytest.raises(InvalidInputError, match="labels must be 0"):
        image_auroc([0, 2], [0.1, 0.2])


def test_roc_points_span_corners_and_serialise_without_inf() -> None:
    points = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert (points[0]["fpr"], points[0]["tpr"]) == (0.0, 0.0)
    assert (points[-1]["fpr"], points[-1]["tpr"]) == (1.0, 1.0)
    assert points[0]["threshold"] is None
    assert all(p["threshold"] is not None for p in points[1:])


def test_roc_points_single_class_is_empty() -> None:
    assert roc_points([0, 0], [0.1, 0.2]) == []


# ------------------------------------------------------------------ threshold rates


def test_rates_at_counts_score_equal_to_threshold_as_ng() -> None:
    rates = rates_at([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9], 0.5)
    assert (rates.tp, rates.fp, rates.tn, rates.fn) == (2, 1, 1, 0)
    assert rates.false_reject_rate == pytest.approx(0.5)
    assert rates.escape_rate == pytest.approx(0.0)
    assert rates.precision == pytest.approx(2 / 3)
    assert rates.recall == pytest.approx(1.0)


def test_f1_at_perfect_threshold_is_one() -> None:
    assert f1_at([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5) == pytest.approx(1.0)


def test_f1_at_threshold_above_everything_is_zero() -> None:
    assert f1_at([0, 1], [0.1, 0.9], 5.0) == pytest.approx(0.0)


def test_f1_at_without_ng_is_none() -> None:
    assert f1_at([0, 0], [0.1, 0.9], 0.5) is None


# ------------------------------------------------------------------ pixel AUROC / AUPRO


def test_pixel_auroc_perfect_map_is_one() -> None:
    mask = _square_mask()
    maps = [mask.astype(np.float32) / 255.0, np.zeros((32, 32), np.float32)]
    assert pixel_auroc(maps, [mask, None]) == pytest.approx(1.0)


def test_pixel_auroc_without_defect_pixels_is_none() -> None:
    assert pixel_auroc([np.random.default_rng(0).random((8, 8))], [None]) is None


def test_pixel_auroc_rejects_shape_mismatch() -> None:
    with pytest.raises(InvalidInputError, match="shape"):
        pixel_auroc([np.zeros((8, 8))], [np.zeros((4, 4))])


def test_aupro_perfect_map_is_one() -> None:
    mask = _square_mask()
    maps = [mask.astype(np.float32) / 255.0, np.zeros((32, 32), np.float32)]
    assert aupro(maps, [mask, None]) == pytest.approx(1.0)


def test_aupro_zero_map_is_chance_level() -> None:
    mask = _square_mask()
    value = aupro([np.zeros((32, 32))], [mask], fpr_limit=0.3)
    assert value is not None
    assert value == pytest.approx(0.15)  # constant map: the diagonal, mean PRO over [0, 0.3] = 0.15
    assert value < 0.2


def test_aupro_inverted_map_is_zero() -> None:
    mask = _square_mask()
    inverted = 1.0 - mask.astype(np.float64) / 255.0
    assert aupro([inverted], [mask]) == pytest.approx(0.0)


def test_aupro_weighs_regions_equally_whatever_their_size() -> None:
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[2:22, 2:22] = 255  # a big region (400 px), found
    mask[30:32, 30:32] = 255  # a small region (4 px), missed
    amap = np.zeros((40, 40))
    amap[2:22, 2:22] = 1.0
    curve = pro_curve([amap], [mask])
    assert curve is not None
    fpr, pro = curve
    # at FPR 0 the big region is fully covered and the small one not at all: PRO = 1/2, not 400/404
    assert pro[fpr == 0].max() == pytest.approx(0.5)


def test_aupro_regions_are_per_connected_component() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    mask[10:13, 10:13] = 255
    amap = np.zeros((20, 20))
    amap[2:5, 2:5] = 1.0  # one of two regions found
    curve = pro_curve([amap], [mask])
    assert curve is not None
    assert curve[1][curve[0] == 0].max() == pytest.approx(0.5)


def test_aupro_without_regions_is_none() -> None:
    assert aupro([np.zeros((8, 8))], [None]) is None


def test_aupro_rejects_bad_fpr_limit() -> None:
    with pytest.raises(InvalidInputError, match="fpr_limit"):
        aupro([np.zeros((8, 8))], [_square_mask(8, lo=1, hi=3)], fpr_limit=0.0)


def test_binarize_mask_uses_127_for_grey_edges() -> None:
    mask = np.array([[0, 100, 128, 255]], dtype=np.uint8)
    assert binarize_mask(mask).tolist() == [[False, False, True, True]]


# ------------------------------------------------------------------ report


def test_evaluate_scores_reports_overall_and_per_class() -> None:
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.25, 0.7]
    classes = ["good", "good", "good", "pit", "pit", "crack", "crack"]
    report = evaluate_scores(labels=labels, scores=scores, threshold=0.5, defect_classes=classes)
    assert report.overall["image_auroc"] == pytest.approx(11 / 12)
    assert report.overall["false_reject_rate"] == pytest.approx(0.0)
    assert report.overall["escape_rate"] == pytest.approx(0.25)
    assert report.per_class["pit"]["image_auroc"] == pytest.approx(1.0)
    assert report.per_class["pit"]["recall"] == pytest.approx(1.0)
    assert report.per_class["crack"]["image_auroc"] == pytest.approx(5 / 6)
    assert report.per_class["crack"]["recall"] == pytest.approx(0.5)
    assert report.overall["pixel_auroc"] is None and report.overall["aupro"] is None
    flat = report.flat_metrics()
    assert flat["crack.recall"] == pytest.approx(0.5)
    assert "pixel_auroc" not in flat


def test_evaluate_scores_pixel_metrics_skip_ng_without_mask() -> None:
    mask = _square_mask()
    perfect = mask.astype(np.float64) / 255.0
    report = evaluate_scores(
        labels=[0, 1, 1], scores=[0.1, 0.9, 0.8], threshold=0.5, defect_classes=["good", "pit", "pit"],
        maps=[np.zeros((32, 32)), perfect, np.ones((32, 32))], masks=[None, mask, None],
    )
    assert report.overall["pixel_auroc"] == pytest.approx(1.0)
    assert report.overall["aupro"] == pytest.approx(1.0)


def test_evaluate_scores_tells_which_defect_class_the_maps_miss() -> None:
    """Per class, the class's pixels with the good images': a class found where it is scores 1, one whose maps
    light up elsewhere scores low, and the pooled figure sits between them."""
    mask = _square_mask()
    found = mask.astype(np.float64) / 255.0
    elsewhere = np.roll(found, 12, axis=(0, 1))  # the same spot, off the defect
    report = evaluate_scores(
        labels=[0, 1, 1], scores=[0.1, 0.9, 0.8], threshold=0.5, defect_classes=["good", "pit", "uneven"],
        maps=[np.zeros((32, 32)), found, elsewhere], masks=[None, mask, mask],
    )
    assert report.per_class["pit"]["pixel_auroc"] == pytest.approx(1.0)
    assert report.per_class["pit"]["aupro"] == pytest.approx(1.0)
    assert report.per_class["uneven"]["pixel_auroc"] < 0.6
    assert report.per_class["uneven"]["aupro"] < 0.25
    overall = report.overall["pixel_auroc"]
    assert overall is not None and report.per_class["uneven"]["pixel_auroc"] < overall < 1.0
    assert report.flat_metrics()["uneven.pixel_auroc"] == report.per_class["uneven"]["pixel_auroc"]


# ------------------------------------------------------------------ plots


def test_plots_write_png_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    roc = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    images = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    maps = [rng.random((24, 32)).astype(np.float32) for _ in range(3)]
    paths = [
        plot_roc(roc, tmp_path / "roc.png"),
        plot_score_histogram([0.1, 0.2], [0.8, 0.9], 0.5, tmp_path / "hist.png"),
        plot_gallery(images, maps, ["a", "b", "c"], tmp_path / "sub" / "gallery.png"),
        plot_gallery([], [], [], tmp_path / "empty.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_histogram_counts_every_score() -> None:
    rows = score_histogram([0.1, 0.2, 0.3], [0.8, 0.9], n_bins=5)
    assert sum(r["ok"] for r in rows) == 3
    assert sum(r["ng"] for r in rows) == 2


def test_module_import_does_not_load_plotting_or_sklearn() -> None:
    code = (
        "import sys, bdi.data.metrics; "
        "print(any(m in sys.modules for m in ('matplotlib', 'sklearn', 'scipy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
