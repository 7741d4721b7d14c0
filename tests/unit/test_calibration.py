from __future__ import annotations

import math

import pytest

from bdi.backbones import DINOV2_VITS14, EFFICIENTNET_LITE0
from bdi.config import ScoringConfig
from bdi.errors import CalibrationMissingError, InsufficientSamplesError, InvalidInputError
from bdi.patchcore.calibration import Calibration, choose_threshold, resolved_percentile, usable_calibration
from bdi.refs import ModelRef

OK = [10, 11, 13]


def test_midpoint_rule_contract_case_c1() -> None:
    choice = choose_threshold(OK, [22], score_percentile=99)
    assert choice.ok_score_at_percentile == pytest.approx(12.96)
    assert choice.ng_score_at_percentile == pytest.approx(22.0)
    assert choice.threshold == pytest.approx(17.48)
    assert choice.ok_mean == pytest.approx(34 / 3)
    assert choice.ng_mean == 22.0


@pytest.mark.parametrize("ng", [None, []])
def test_without_ng_threshold_is_ok_percentile_contract_c2_c4(ng: list[float] | None) -> None:
    choice = choose_threshold(OK, ng, score_percentile=99)
    assert choice.threshold == pytest.approx(12.96)
    assert choice.ng_score_at_percentile is None
    assert choice.ng_mean == 0.0
    assert choice.escape_rate is None


def test_overlapping_ng_scales_ok_percentile_contract_c3() -> None:
    assert choose_threshold(OK, [12], score_percentile=99).threshold == pytest.approx(12.96 * 1.02)


def test_score_percentile_50_uses_median_contract_c6() -> None:
    choice = choose_threshold(OK, [22], score_percentile=50)
    assert choice.ok_score_at_percentile == 11.0
    assert choice.threshold == pytest.approx(16.5)


@pytest.mark.parametrize("ok", [[], [math.nan, math.inf]])
def test_no_finite_ok_score_is_an_error_contract_c5(ok: list[float]) -> None:
    with pytest.raises(InsufficientSamplesError, match="al menos 1 score OK"):
        choose_threshold(ok, [1.0], score_percentile=99)


def test_non_numeric_score_is_invalid_input_contract_c10() -> None:
    with pytest.raises(InvalidInputError):
        choose_threshold([1.0, "a"], None, score_percentile=99)


def test_nan_and_inf_are_dropped() -> None:
    choice = choose_threshold([1.0, math.nan, 2.0, -math.inf], [math.inf, 5.0], score_percentile=99)
    assert choice.n_ok == 2 and choice.n_ng == 1


def test_error_rates_at_the_chosen_threshold() -> None:
    choice = choose_threshold([1, 2, 3, 4], [2.5, 9, 10], score_percentile=100)
    # p_ok = 4, p5_ng = 2.65 <= 4 -> threshold 4.08: no OK rejected, one NG (2.5) escapes
    assert choice.false_reject_rate == 0.0
    assert choice.escape_rate == pytest.approx(1 / 3)


def _calib(threshold: float, memory_fingerprint: str | None) -> Calibration:
    return Calibration(threshold=threshold, score_percentile=99, area_mm2_thr=1.0,
                       memory_fingerprint=memory_fingerprint)


def test_usable_calibration_rejects_missing_nonpositive_and_stale() -> None:
    with pytest.raises(CalibrationMissingError):
        usable_calibration(None, memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError, match="threshold <= 0"):
        usable_calibration(_calib(0.0, "a"), memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError, match="threshold missing"):
        usable_calibration(_calib(math.inf, "a"), memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError, match="stale"):
        usable_calibration(_calib(1.0, "b"), memory_fingerprint="a")
    assert usable_calibration(_calib(1.5, "a"), memory_fingerprint="a").threshold == 1.5


def test_calibration_missing_message_keeps_gui_token() -> None:
    with pytest.raises(CalibrationMissingError) as info:
        usable_calibration(_calib(-1.0, "a"), memory_fingerprint="a")
    assert "calibration_missing" in str(info.value)


@pytest.mark.parametrize("recorded", [None, "", 0, ["a"]], ids=["null", "empty", "number", "list"])
def test_calibration_without_a_memory_fingerprint_never_applies(recorded: object) -> None:
    """Staleness is never skipped because the field is missing (issue 16)."""
    stored = Calibration.from_dict({"threshold": 1.5, "memory_fingerprint": recorded},
                                   defaults=ScoringConfig(score_percentile=99))
    with pytest.raises(CalibrationMissingError, match="^calibration_missing: unbound"):
        usable_calibration(stored, memory_fingerprint="a")
    with pytest.raises(CalibrationMissingError, match="^calibration_missing: unbound"):
        usable_calibration(_calib(1.5, None), memory_fingerprint="a")


@pytest.mark.parametrize("stored", [{}, {"score_percentile": 99}, {"threshold": "1.5"}, {"threshold": True}],
                         ids=["empty", "no-threshold", "text", "bool"])
def test_a_stored_object_without_a_numeric_threshold_reads_as_calibration_missing(stored: dict[str, object]) -> None:
    with pytest.raises(CalibrationMissingError):
        Calibration.from_dict(stored, defaults=ScoringConfig(score_percentile=99))


NG_FILE_KEYS = ["threshold", "ok_mean", "ng_mean", "p99_ok", "p5_ng", "mm_per_px", "area_mm2_thr", "score_percentile",
                "created_at_utc", "memory_fingerprint", "n_ok", "n_ng", "false_reject_rate", "escape_rate"]


def test_calibration_from_client_scores_writes_the_calibrate_ng_keys_and_reads_back() -> None:
    calib = Calibration.from_choice(choose_threshold(OK, None, score_percentile=99.7), area_mm2_thr=2.0,
                                    memory_fingerprint="m", created_at_utc="t", mm_per_px=0.2, statistics=True)
    body = calib.to_dict()
    assert list(body) == NG_FILE_KEYS
    assert body["score_percentile"] == 99 and body["p5_ng"] is None
    assert body["p99_ok"] == calib.statistics.ok_score_at_percentile  # type: ignore[union-attr]
    assert Calibration.from_dict(body, defaults=ScoringConfig()) == calib


def test_calibration_from_the_dataset_writes_the_ids_and_no_statistics() -> None:
    ids = ModelRef(recipe_id="r", role_id="a", roi_id="b", model_key="k")
    calib = Calibration.from_choice(choose_threshold(OK, [22], score_percentile=99), area_mm2_thr=1.0,
                                    memory_fingerprint="m", created_at_utc="t", ids=ids)
    body = calib.to_dict()
    assert set(body) == {"threshold", "score_percentile", "area_mm2_thr", "recipe_id", "role_id", "roi_id",
                         "model_key", "created_at_utc", "memory_fingerprint", "n_ok", "n_ng", "false_reject_rate",
                         "escape_rate"}
    assert Calibration.from_dict(body, defaults=ScoringConfig()) == calib


def test_an_old_calibration_file_takes_the_missing_percentile_and_area_from_the_resolved_scoring() -> None:
    stored = Calibration.from_dict({"threshold": 2, "memory_fingerprint": "a"},
                                   defaults=ScoringConfig(score_percentile=95, area_mm2_thr=3.0))
    calib = usable_calibration(stored, memory_fingerprint="a")
    assert (calib.threshold, calib.score_percentile, calib.area_mm2_thr) == (2.0, 95, 3.0)
    assert calib.scoring(ScoringConfig()).score_percentile == 95


@pytest.mark.parametrize(("backbone", "percentile"), [(DINOV2_VITS14, 99), (EFFICIENTNET_LITE0, 100)])
def test_an_old_calibration_file_reads_with_the_backbone_percentile(backbone: str, percentile: int) -> None:
    calib = Calibration.from_dict({"threshold": 2}, defaults=ScoringConfig().resolved(backbone))
    assert calib.score_percentile == percentile


def test_an_unresolved_scoring_config_is_never_a_percentile() -> None:
    with pytest.raises(ValueError, match="unresolved"):
        resolved_percentile(ScoringConfig())
    with pytest.raises(ValueError, match="unresolved"):
        Calibration.from_dict({"threshold": 2}, defaults=ScoringConfig())
