"""Operator feedback's arithmetic (bdi.monitoring.feedback): region areas, verdicts checked against the decision,
the rates per ROI with recall by defect area, and a torn feedback line skipped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bdi.errors import InvalidInputError
from bdi.monitoring.feedback import (
    FEEDBACK_FILE,
    CorrectedRegion,
    Feedback,
    append_feedback,
    check_verdict,
    feedback_rates,
    read_feedback,
)
from bdi.monitoring.record import InspectionRecord

RECORD = InspectionRecord(
    id="i0", ts="2026-01-01T00:00:00.000000Z", request_id="r0", recipe_id="default", role_id="R", roi_id="roi",
    model_key="roi", memory_fingerprint="fp", registered_model=None, registered_version=None, registered_alias=None,
    score=9.0, threshold=5.0, decision="ng", mm_per_px=0.5, n_regions=1, largest_region_mm2=3.0,
    image_sha256="0" * 64, image_bytes=1, width=1, height=1, brightness=1.0, contrast=1.0, sharpness=1.0)


def _verdict(i: int, verdict: str, area: float | None) -> Feedback:
    return Feedback(ts="t", verdict=verdict, inspection_id=f"i{i}", request_id=f"r{i}", recipe_id="default",
                    role_id="R", roi_id="roi", model_key="roi", memory_fingerprint="fp", decision="ng", score=1.0,
                    area_mm2=area, sample=None, label="ng")


def test_region_areas_and_verdicts_against_the_decision() -> None:
    assert CorrectedRegion(bbox=(0, 0, 4, 5)).area_px() == 20
    assert CorrectedRegion(polygon=((0, 0), (4, 0), (4, 4), (0, 4))).area_px() == 16
    with pytest.raises(InvalidInputError):
        CorrectedRegion(bbox=(0, 0, 4, 5), polygon=((0, 0), (1, 0), (1, 1)))
    with pytest.raises(InvalidInputError, match="finite"):  # its area would overflow the feedback log's JSON
        CorrectedRegion(bbox=(0, 0, 1e300, 1e300))
    assert check_verdict("false_reject", RECORD) == "ok"
    assert check_verdict("confirmed_defect", RECORD) == "ng"
    with pytest.raises(InvalidInputError, match="decided 'ng'"):
        check_verdict("missed_defect", RECORD)
    assert check_verdict("missed_defect", replace(RECORD, decision="ok")) == "ng"


def test_rates_count_the_latest_verdict_and_bucket_recall_by_area(tmp_path: Path) -> None:
    given = [_verdict(0, "false_reject", None), _verdict(1, "confirmed_defect", 0.5),
             _verdict(2, "missed_defect", 0.7), _verdict(3, "confirmed_defect", 30.0),
             _verdict(0, "confirmed_defect", 2.0)]  # i0 reconsidered: the latest verdict counts
    for item in given:
        append_feedback(tmp_path, item)
    with (tmp_path / FEEDBACK_FILE).open("ab") as handle:
        handle.write(b'{"ts": "torn')
    read = read_feedback(tmp_path)
    assert len(read) == 5
    rates = feedback_rates(read, [RECORD] * 10)
    assert rates["n_false_reject"] == 0 and rates["n_confirmed_defect"] == 3 and rates["n_missed_defect"] == 1
    assert rates["escape_rate"] == pytest.approx(0.1) and rates["recall"] == pytest.approx(0.75)
    assert rates["recall_by_area_mm2"]["0-1"] == {"detected": 1, "missed": 1, "recall": 0.5}
    assert rates["recall_by_area_mm2"][">=20"]["recall"] == 1.0
