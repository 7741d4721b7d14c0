"""Both folds with intervals (bench.quality_folds, issue 29): the operating points, the stratified bootstrap and the
paired verdict "better only where the interval says so"."""

from __future__ import annotations

import numpy as np
import pytest

from bdi.config import CalibrationConfig
from bench.quality_folds import Half, Operating, calibrate, compare, fold_report, frr_at_escape_budget, image_figures


def _half(ok: list[float], ng: list[float]) -> Half:
    return Half(labels=np.r_[np.zeros(len(ok)), np.ones(len(ng))].astype(int), scores=np.asarray(ok + ng))


def test_frr_at_an_escape_budget_is_the_roc_operating_point() -> None:
    ok, ng = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.5, 5.0, 6.0, 7.0])
    assert frr_at_escape_budget(ok, ng, 0.0) == 0.5  # threshold 2.5: OK 3 and 4 rejected
    assert frr_at_escape_budget(ok, ng, 0.25) == 0.0  # NG 2.5 may escape: threshold 5.0
    assert frr_at_escape_budget(ok, np.array([]), 0.0) is None


def test_image_figures_at_the_calibrated_threshold_and_the_band() -> None:
    ok, ng = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.5, 5.0, 6.0, 7.0])
    figures = image_figures(ok, ng, Operating(threshold=3.5, band_low=2.5, band_high=4.5))
    assert (figures["false_reject_rate"], figures["escape_rate"]) == (0.25, 0.25)
    assert (figures["band_escape_rate"], figures["band_false_reject_rate"]) == (0.0, 0.0)
    assert figures["review_rate"] == pytest.approx(3 / 8)  # OK 3, 4 and NG 2.5


def test_calibrate_sets_the_threshold_rule_and_the_band_of_the_calibration_half() -> None:
    op = calibrate(_half([1.0, 2.0, 3.0], [2.5, 6.0]), score_percentile=100, cfg=CalibrationConfig())
    assert op.threshold == pytest.approx(1.02 * 3.0)  # p5(NG) 2.675 <= p100(OK) 3
    assert op.band_low == 2.5 and op.band_high is not None and 3.0 < op.band_high < 3.0001


def test_each_fold_has_an_interval_around_its_value_and_the_mean_is_the_folds_mean() -> None:
    rng = np.random.default_rng(1)
    a = _half(list(rng.normal(1.0, 0.3, 10)), list(rng.normal(2.0, 0.5, 30)))
    b = _half(list(rng.normal(1.0, 0.3, 10)), list(rng.normal(2.0, 0.5, 30)))
    cfg = CalibrationConfig()
    folds = [(b, calibrate(a, score_percentile=100, cfg=cfg)), (a, calibrate(b, score_percentile=100, cfg=cfg))]
    report, _ = fold_report(folds, n_boot=200, n_boot_pixel=0)
    for fold in report["folds"]:
        entry = fold["image_auroc"]
        assert entry["ci"][0] <= entry["value"] <= entry["ci"][1] and entry["ci"][0] < entry["ci"][1]
    mean = report["mean"]["image_auroc"]["value"]
    assert mean == pytest.approx(np.mean([f["image_auroc"]["value"] for f in report["folds"]]))


def test_a_row_is_better_only_where_the_paired_interval_excludes_zero() -> None:
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    good = Half(labels=labels, scores=np.r_[rng.normal(0, 1, 20), rng.normal(4, 1, 20)])
    poor = Half(labels=labels, scores=np.r_[rng.normal(0, 1, 20), rng.normal(0.3, 1, 20)])
    twin = Half(labels=labels, scores=good.scores + 1e-6)  # the same detector, shifted
    op = Operating(threshold=1.0, band_low=None, band_high=None)

    def report(half: Half) -> tuple[dict[str, object], object]:
        return fold_report([(half, op), (half, op)], n_boot=300, n_boot_pixel=0)

    ours = report(good)
    assert compare(ours, report(poor))["image_auroc"]["verdict"] == "better"  # type: ignore[arg-type]
    assert compare(report(poor), ours)["image_auroc"]["verdict"] == "worse"  # type: ignore[arg-type]
    assert compare(ours, report(twin))["image_auroc"]["verdict"] == "no difference shown"  # type: ignore[arg-type]
