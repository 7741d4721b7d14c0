from __future__ import annotations

import math

import pytest

from bdi.calibration import choose_threshold, usable_threshold
from bdi.errors import CalibrationMissingError, InsufficientSamplesError, InvalidInputError

OK = [10, 11, 13]


def test_midpoint_rule_contract_case_c1() -> None:
    choice = choose_threshold(OK, [22], score_percentile=99)
    assert choice.p99_ok == pytest.approx(12.96)
    assert choice.p5_ng == pytest.approx(22.0)
    assert choice.threshold == pytest.approx(17.48)
    assert choice.ok_mean == pytest.approx(34 / 3)
    assert choice.ng_mean == 22.0


@pytest.mark.parametrize("ng", [None, []])
def test_without_ng_threshold_is_ok_percentile_contract_c2_c4(ng: list[float] | None) -> None:
    choice = choose_threshold(OK, ng)
    assert choice.threshold == pytest.approx(12.96)
    assert choice.p5_ng is None
    assert choice.ng_mean == 0.0
    assert choice.escape_rate is None


def test_overlapping_ng_scales_ok_percentile_contract_c3() -> None:
    assert choose_threshold(OK, [12]).threshold == pytest.approx(12.96 * 1.02)


def test_score_percentile_50_uses_median_contract_c6() -> None:
    choice = choose_threshold(OK, [22], score_percentile=50)
    assert choice.p99_ok == 11.0
    assert choice.threshold == pytest.approx(16.5)


@pytest.mark.parametrize("ok", [[], [math.nan, math.inf]])
def test_no_finite_ok_score_is_an_error_contract_c5(ok: list[float]) -> None:
    with pytest.raises(InsufficientSamplesError, match="al menos 1 score OK"):
        choose_threshold(ok, [1.0])


def test_non_numeric_score_is_invalid_input_contract_c10() -> None:
    with pytest.raises(InvalidInputError):
        choose_threshold([1.0, "a"], None)


def test_nan_and_inf_are_dropped() -> None:
    choice = choose_threshold([1.0, math.nan, 2.0, -math.inf], [math.inf, 5.0])
    assert choice.n_ok == 2 and choice.n_ng == 1


def test_error_rates_at_the_chosen_threshold() -> None:
    choice = choose_threshold([1, 2, 3, 4], [2.5, 9, 10], score_percentile=100)
    # p_ok = 4, p5_ng = 2.65 <= 4 -> threshold 4.08: no OK rejected, one NG (2.5) escapes
    assert choice.false_reject_rate == 0.0
    assert choice.escape_rate == pytest.approx(1 / 3)


def test_usable_threshold_rejects_missing_nonpositive_and_stale() -> None:
    with pytest.raises(CalibrationMissingError):
        usable_threshold(None, memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError):
        usable_threshold({"threshold": 0.0}, memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError, match="stale"):
        usable_threshold({"threshold": 1.0, "memory_fingerprint": "b"}, memory_fingerprint="a")
    assert usable_threshold({"threshold": 1.5, "memory_fingerprint": "a"}, memory_fingerprint="a") == 1.5


def test_calibration_missing_message_keeps_gui_token() -> None:
    with pytest.raises(CalibrationMissingError) as info:
        usable_threshold({"threshold": -1}, memory_fingerprint="a")
    assert "calibration_missing" in str(info.value)


@pytest.mark.parametrize("recorded", [None, "", 0, ["a"]], ids=["null", "empty", "number", "list"])
def test_calibration_without_a_memory_fingerprint_never_applies(recorded: object) -> None:
    """Staleness is never skipped because the field is missing (issue 16)."""
    with pytest.raises(CalibrationMissingError, match="^calibration_missing: unbound"):
        usable_threshold({"threshold": 1.5, "memory_fingerprint": recorded}, memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError, match="^calibration_missing: unbound"):
        usable_threshold({"threshold": 1.5}, memory_fingerprint="a")
