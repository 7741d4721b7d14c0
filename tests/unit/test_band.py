"""The OK / review / NG band (docs/design.md "Two thresholds: OK, review, NG"): the calibration rule, its file keys,
and the verdict it gives a score."""

from __future__ import annotations

import pytest

from bdi.backbones import EFFICIENTNET_LITE0
from bdi.config import CalibrationConfig, ScoringConfig, Settings
from bdi.patchcore.calibration import Band, Calibration, band_rates, choose_band, choose_threshold, judge

SCORING = ScoringConfig().resolved(EFFICIENTNET_LITE0)
# overlapping classes: 20 OK in [1.0, 2.9], 10 NG in [2.0, 6.5]
OK = [1.0 + 0.1 * i for i in range(20)]
NG = [2.0 + 0.5 * i for i in range(10)]


def test_overlapping_classes_get_a_band_that_keeps_each_budget_on_the_calibration_scores() -> None:
    band = choose_band(OK, NG, threshold=3.0, cfg=CalibrationConfig(escape_budget=0.0, false_reject_budget=0.1))
    assert band is not None and not band.collapsed
    assert band.threshold_low == 2.0  # the lowest NG score: no NG below it
    assert 2.7 < band.threshold_high <= 2.8 + 1e-9  # 2 of 20 OK (10 %) at or above it: 2.8 and 2.9
    assert band.escape_rate == 0.0 and band.false_reject_rate == pytest.approx(0.1)
    # OK 2.0 … 2.7 (8) and NG 2.0, 2.5 (2) lie in [low, high)
    assert band.review_rate == pytest.approx(10 / 30)
    assert [band.verdict(s) for s in (1.9, 2.0, 2.65, 2.75, 9.0)] == ["ok", "review", "review", "ng", "ng"]


def test_an_escape_budget_lets_the_lowest_ng_scores_pass_and_shrinks_the_review_lane() -> None:
    strict = choose_band(OK, NG, threshold=3.0, cfg=CalibrationConfig(escape_budget=0.0))
    loose = choose_band(OK, NG, threshold=3.0, cfg=CalibrationConfig(escape_budget=0.2))
    assert strict is not None and loose is not None
    assert loose.threshold_low == 3.0 and loose.escape_rate == pytest.approx(0.2)  # NG 2.0 and 2.5 pass
    assert loose.review_rate is not None and strict.review_rate is not None
    assert loose.review_rate < strict.review_rate


def test_separated_classes_collapse_the_band_to_one_threshold_that_meets_both_budgets() -> None:
    ok, ng = [1.0, 1.1, 1.2], [5.0, 6.0]
    threshold = choose_threshold(ok, ng, score_percentile=100).threshold  # midpoint of 1.2 and p5(NG) 5.05
    band = choose_band(ok, ng, threshold=threshold, cfg=CalibrationConfig())
    assert band is not None and band.collapsed
    assert band.threshold_low == band.threshold_high == pytest.approx(3.125) == threshold
    assert (band.escape_rate, band.false_reject_rate, band.review_rate) == (0.0, 0.0, 0.0)
    # a single-rule threshold outside [max OK, min NG] is clipped into it
    clipped = choose_band(ok, ng, threshold=0.5, cfg=CalibrationConfig())
    assert clipped is not None and 1.2 < clipped.threshold_low == clipped.threshold_high <= 1.2 + 1e-9


def test_ok_only_calibration_keeps_the_single_threshold() -> None:
    assert choose_band(OK, [], threshold=3.0) is None
    assert choose_band(OK, None or [], threshold=3.0) is None


def test_a_review_score_is_decided_on_the_review_decision_side_fail_safe_ng_by_default() -> None:
    band = Band(threshold_low=2.0, threshold_high=3.0, escape_budget=0.0, false_reject_budget=0.05, collapsed=False)
    assert judge(2.5, threshold=2.8, band=band).decision == "ng"
    assert judge(2.5, threshold=2.8, band=band).review is True
    assert judge(2.5, threshold=2.8, band=band, review_decision="ok").decision == "ok"
    assert judge(1.0, threshold=2.8, band=band) == judge(1.0, threshold=2.8, band=band, review_decision="ok")
    assert judge(3.0, threshold=2.8, band=band).decision == "ng"
    assert judge(1.0, threshold=2.8, band=band).decision == "ok"
    no_band = judge(2.5, threshold=2.8, band=None)
    assert (no_band.decision, no_band.review, no_band.threshold_low, no_band.threshold_high) == ("ok", False, None,
                                                                                                 None)


def test_the_band_is_stored_additively_and_an_old_file_reads_with_no_band() -> None:
    choice = choose_threshold(OK, NG, score_percentile=100)
    band = choose_band(OK, NG, threshold=choice.threshold)
    calib = Calibration.from_choice(choice, area_mm2_thr=1.0, memory_fingerprint="f" * 8,
                                    created_at_utc="2026-01-01T00:00:00Z", band=band)
    stored = calib.to_dict()
    assert stored["threshold"] == choice.threshold  # the contract's rule, unchanged
    assert stored["threshold_low"] == band.threshold_low and stored["threshold_high"] == band.threshold_high
    assert Calibration.from_dict(stored, defaults=SCORING).band == band
    old = {k: v for k, v in stored.items() if not k.startswith(("threshold_", "band_", "review_"))}
    assert Calibration.from_dict(old, defaults=SCORING).band is None
    assert "threshold_low" not in Calibration.from_dict(old, defaults=SCORING).metrics()
    assert calib.metrics()["review_rate"] == band.review_rate


def test_a_crossed_band_in_a_file_is_no_band() -> None:
    stored = {"threshold": 2.0, "threshold_low": 3.0, "threshold_high": 2.0}
    assert Calibration.from_dict(stored, defaults=SCORING).band is None


def test_band_rates_count_escapes_false_rejects_and_reviews() -> None:
    import numpy as np

    rates = band_rates(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 4.0]), low=2.0, high=3.0)
    assert rates.escape_rate == pytest.approx(1 / 3)  # NG 1.5
    assert rates.false_reject_rate == pytest.approx(1 / 3)  # OK 3.0
    assert rates.n_review == 2 and rates.review_rate == pytest.approx(2 / 6)  # OK 2.0, NG 2.5


@pytest.mark.parametrize("name", ["escape_budget", "false_reject_budget"])
def test_budgets_outside_zero_one_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CalibrationConfig(**{name: 1.0})  # type: ignore[arg-type]


def test_the_band_settings_have_one_default_and_a_flat_env_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().calibration == CalibrationConfig()
    assert (CalibrationConfig().band, CalibrationConfig().review_decision) == (True, "ng")
    monkeypatch.setenv("BDI_CALIBRATION_ESCAPE_BUDGET", "0.1")
    monkeypatch.setenv("BDI_REVIEW_DECISION", "ok")
    monkeypatch.setenv("BDI_CALIBRATION_BAND", "0")
    cal = Settings().calibration
    assert (cal.escape_budget, cal.review_decision, cal.band) == (0.1, "ok", False)
