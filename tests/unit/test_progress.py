"""bdi.storage.progress: the file GET /progress reads, written by a fit's or calibration's progress callback."""

from __future__ import annotations

from pathlib import Path

from bdi.refs import ModelRef
from bdi.storage.progress import ProgressStore

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)
OTHER = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key="other")


def test_a_job_reports_each_stage_then_done_and_other_models_are_untouched(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path)
    forwarded: list[tuple[str, int, int]] = []
    tracker = store.tracker(REF, "fit", forward=lambda *step: forwarded.append(step))
    assert store.read(REF) is None  # nothing until the job reports
    tracker("encode", 4, 10)
    seen = store.read(REF)
    assert seen is not None and (seen["job"], seen["state"], seen["stage"], seen["done"], seen["total"]) == (
        "fit", "running", "encode", 4, 10)
    for done in range(5, 11):  # throttled, but a stage's last count is always written
        tracker("encode", done, 10)
    tracker("coreset", 256, 256)
    tracker.finish()
    final = store.read(REF)
    assert final is not None and final["state"] == "done" and final["error"] is None
    assert final["stages"] == {"encode": [10, 10], "coreset": [256, 256]}
    assert forwarded[-1] == ("coreset", 256, 256) and len(forwarded) == 8  # the caller's callback gets every step
    assert store.read(OTHER) is None


def test_a_failed_job_says_so_and_a_job_refused_before_its_work_leaves_the_last_progress(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path)
    first = store.tracker(REF, "calibrate")
    first("score_ok", 3, 8)
    first.finish(error=RuntimeError("sample 4 unreadable"))
    failed = store.read(REF)
    assert failed is not None and failed["state"] == "failed" and failed["error"] == "sample 4 unreadable"
    refused = store.tracker(REF, "fit")  # e.g. waited on another fit's lock, never encoded anything
    refused.finish(error=RuntimeError("fit in progress"))
    assert store.read(REF) == failed


def test_a_file_that_is_not_a_progress_document_reads_as_none(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path)
    path = store.path(REF)
    path.parent.mkdir(parents=True)
    foreign_job = '{"job": "delete", "state": "done", "done": 1, "total": 1, "stages": {}}'
    for text in ("{", "[]", '{"job": "fit"}', foreign_job):
        path.write_text(text, encoding="utf-8")
        assert store.read(REF) is None, text
