"""The audit trail (bdi.security.audit): hash-chained, append-only; verify names an edited, removed or moved
record, and tells a crash's torn line from tampering."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bdi.security.audit import AuditEvent, AuditLog, verify

EVENT = AuditEvent(action="calibrate", outcome="ok", key_id="k1", key_label="line-3-gui", client="10.0.0.7",
                   request_id="r", route="POST /calibrate_manual",
                   roi={"recipe_id": "default", "role_id": "Inspection", "roi_id": "inspection-1"},
                   before={"memory_fingerprint": "a", "threshold": 1.0},
                   after={"memory_fingerprint": "a", "threshold": 2.0})


def _log(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path)
    for i in range(n):
        log.append(AuditEvent(**{**EVENT.__dict__, "request_id": f"r{i}"}))
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_an_untouched_trail_verifies(tmp_path: Path) -> None:
    log = _log(tmp_path)
    report = verify(log.path)
    assert report.ok and report.records == 5 and not report.artefacts
    assert [r["seq"] for r in log.records()] == [1, 2, 3, 4, 5]


def test_an_edited_record_is_named(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    lines[2] = lines[2].replace('"threshold":2.0', '"threshold":9.0')
    log.path.write_text("".join(lines), encoding="utf-8")
    report = verify(log.path)
    assert not report.ok
    assert [(p.line, p.seq, p.kind) for p in report.problems] == [(3, 3, "edited")]


def test_a_deleted_record_is_named(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    del lines[1]
    log.path.write_text("".join(lines), encoding="utf-8")
    [problem] = verify(log.path).problems
    assert problem.seq == 3 and problem.kind == "chain" and "seq 2..2" in problem.message


def test_swapped_records_are_named(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    log.path.write_text("".join(lines), encoding="utf-8")
    report = verify(log.path)
    assert not report.ok and report.problems[0].line == 2 and report.problems[0].seq == 3


def test_a_rehashed_edit_still_breaks_the_chain_at_the_next_record(tmp_path: Path) -> None:
    from bdi.security.audit import record_hash

    log = _log(tmp_path)
    lines = _lines(log)
    record = json.loads(lines[1])
    record["key_label"] = "someone-else"
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    log.path.write_text("".join(lines), encoding="utf-8")
    [problem] = verify(log.path).problems
    assert problem.seq == 3 and problem.kind == "chain"


def test_a_torn_final_line_is_a_crash_artefact_and_the_next_append_does_not_chain_onto_it(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    with log.path.open("ab") as fh:
        fh.write(b'{"seq":4,"time":"2026-')  # what a crash mid-write leaves
    report = verify(log.path)
    assert report.ok and [a.kind for a in report.artefacts] == ["torn"]
    record = log.append(EVENT)
    assert record["seq"] == 4 and "torn_before" in record
    report = verify(log.path)
    assert report.ok and report.records == 4 and [a.line for a in report.artefacts] == [4]


def test_a_line_of_garbage_inside_the_trail_is_tampering(tmp_path: Path) -> None:
    log = _log(tmp_path, 3)
    lines = _lines(log)
    lines.insert(1, "garbage\n")
    log.path.write_text("".join(lines), encoding="utf-8")
    report = verify(log.path)
    assert not report.ok and report.problems[0].kind == "unreadable" and report.problems[0].line == 2


def _append_many(root: str, n: int, tag: str) -> None:
    log = AuditLog(Path(root))
    for i in range(n):
        log.append(AuditEvent(action="samples.upload", outcome="ok", request_id=f"{tag}-{i}"))


def test_two_processes_appending_at_once_never_interleave_or_lose_records(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), 60, tag)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    report = verify(AuditLog(tmp_path).path)
    assert report.ok and report.records == 120
    ids = {r["request_id"] for r in AuditLog(tmp_path).records()}
    assert ids == {f"{t}-{i}" for t in "ab" for i in range(60)}


def test_a_sigkill_mid_append_leaves_a_verifiable_trail(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from bdi.security.audit import AuditEvent, AuditLog\n"
            "log = AuditLog(Path(sys.argv[1]))\n"
            "while True: log.append(AuditEvent(action='fit', outcome='ok', detail={'pad': 'x' * 20000}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=os.environ.copy())
    path = AuditLog(tmp_path).path
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 200_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    report = verify(path)
    assert report.ok and report.records >= 5
    AuditLog(tmp_path).append(EVENT)  # the trail goes on after the crash
    assert verify(path).ok
