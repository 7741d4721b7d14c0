"""The inspection record on disk (bdi.monitoring.record): per-process segments merged on read, torn lines skipped,
rotation and retention, filters and pages, and the CSV/Parquet export read back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from bdi.cli import main as bdi_main
from bdi.errors import InvalidInputError
from bdi.monitoring.export import export_records
from bdi.monitoring.imagestats import image_stats
from bdi.monitoring.record import (
    InspectionLog,
    InspectionQuery,
    InspectionRecord,
    RecordPolicy,
    inspections_dir,
    query_records,
    read_records,
    segments,
)


def _record(i: int, *, roi: str = "roi-1", decision: str = "ok", ts: str | None = None) -> InspectionRecord:
    return InspectionRecord(
        id=f"id-{i:04d}", ts=ts or f"2026-01-01T00:00:{i:02d}.000000Z", request_id=f"req-{i}", recipe_id="default",
        role_id="Inspection", roi_id=roi, model_key=roi, memory_fingerprint="fp", registered_model=None,
        registered_version=None, registered_alias=None, score=float(i), threshold=10.0, decision=decision,
        mm_per_px=0.2, n_regions=0, largest_region_mm2=None, image_sha256="0" * 64, image_bytes=100, width=96,
        height=96, brightness=100.0, contrast=20.0, sharpness=50.0, timings_ms={"forward": 1.5},
    )


def test_records_of_two_writers_are_merged_newest_first(tmp_path: Path) -> None:
    a, b = InspectionLog(tmp_path), InspectionLog(tmp_path)
    for i in range(0, 10, 2):
        a.append(_record(i))
        b.append(_record(i + 1))
    a.close()
    b.close()
    assert len(segments(tmp_path)) == 2
    assert [r.id for r in read_records(tmp_path)] == [f"id-{i:04d}" for i in range(9, -1, -1)]


def test_a_torn_last_line_and_garbage_are_skipped(tmp_path: Path) -> None:
    log = InspectionLog(tmp_path)
    for i in range(3):
        log.append(_record(i))
    log.close()
    (segment,) = segments(tmp_path)
    whole = json.dumps(_record(3).to_dict())
    with segment.open("ab") as handle:
        handle.write(b"\x00\xffnot json\n")
        handle.write(b'{"id": "x"}\n')  # JSON, but not a record
        handle.write(whole[: len(whole) // 2].encode())  # torn: no end, no newline
    assert [r.id for r in read_records(tmp_path)] == ["id-0002", "id-0001", "id-0000"]


def test_segments_rotate_by_size_and_expired_ones_are_removed(tmp_path: Path) -> None:
    log = InspectionLog(tmp_path, RecordPolicy(segment_max_bytes=1500, retention_days=1.0))
    for i in range(6):
        log.append(_record(i))
    assert len(segments(tmp_path)) >= 3
    old = segments(tmp_path)[0]
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    for i in range(6, 12):
        log.append(_record(i))
    log.close()
    assert old not in segments(tmp_path)
    assert len(read_records(tmp_path)) < 12 and read_records(tmp_path)[0].id == "id-0011"


def test_queries_filter_and_page_without_gaps_or_repeats(tmp_path: Path) -> None:
    log = InspectionLog(tmp_path)
    for i in range(30):
        log.append(_record(i, roi="roi-1" if i % 3 else "roi-2", decision="ng" if i % 5 == 0 else "ok"))
    log.close()
    wanted = [r.id for r in read_records(tmp_path) if r.roi_id == "roi-1"]
    seen: list[str] = []
    cursor = None
    while True:
        page = query_records(tmp_path, InspectionQuery(roi_id="roi-1", limit=7, cursor=cursor))
        seen += [r.id for r in page.records]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == wanted and len(wanted) == 20
    ng = query_records(tmp_path, InspectionQuery(decision="ng", since="2026-01-01T00:00:10Z"))
    assert [r.score for r in ng.records] == [25.0, 20.0, 15.0, 10.0]
    with pytest.raises(InvalidInputError):
        InspectionQuery(decision="maybe")
    with pytest.raises(InvalidInputError):
        query_records(tmp_path, InspectionQuery(cursor="%%%"))


def test_export_writes_csv_and_parquet_that_read_back(tmp_path: Path) -> None:
    records = [_record(i) for i in range(5)]
    csv = pd.read_csv(export_records(records, tmp_path / "r.csv", fmt="csv"))
    parquet = pd.read_parquet(export_records(records, tmp_path / "r.parquet", fmt="parquet"))
    for frame in (csv, parquet):
        assert list(frame["id"]) == [r.id for r in records]
        assert list(frame["score"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert list(frame["timing_forward_ms"]) == [1.5] * 5


def test_cli_exports_the_models_dir_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = InspectionLog(inspections_dir(tmp_path / "models"))
    for i in range(4):
        log.append(_record(i, decision="ng" if i == 2 else "ok"))
    log.close()
    out = tmp_path / "ng.parquet"
    assert bdi_main(["inspections", "export", "--format", "parquet", "--out", str(out),
                     "--models-dir", str(tmp_path / "models"), "--decision", "ng"]) == 0
    assert list(pd.read_parquet(out)["id"]) == ["id-0002"]
    assert "wrote 1 inspection records" in capsys.readouterr().out


def test_image_stats_name_brightness_contrast_and_blur() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    base = image_stats(image)
    brighter = image_stats(np.clip(image.astype(np.int16) // 2 + 128, 0, 255).astype(np.uint8))
    blurred = image_stats(cv2.GaussianBlur(image, (0, 0), 3))
    assert brighter.brightness > base.brightness + 30 and brighter.contrast < base.contrast
    assert blurred.sharpness < base.sharpness / 10


def test_the_settings_turn_recording_off_and_bound_retention(tmp_path: Path) -> None:
    from bdi.config import Settings
    from bdi.service.recording import inspection_log

    assert inspection_log(Settings(models_dir=tmp_path, inspections_record=False)) is None
    log = inspection_log(Settings(models_dir=tmp_path, inspections_store_images=True, inspections_image_max_bytes=10))
    assert log is not None and log.root == tmp_path / "_inspections"
    assert log.store_image(b"x" * 11, sha256="ab" * 32, suffix=".png") is None  # over the cap: not kept
    assert log.store_image(b"x" * 10, sha256="ab" * 32, suffix=".png") == f"images/ab/{'ab' * 32}.png"
    with pytest.raises(ValueError, match="retention"):
        Settings(models_dir=tmp_path, inspections_retention_days=0.5, inspections_segment_max_age_s=86400)
