"""The audit trail: one JSON line per state-changing action, hash-chained, append-only (docs/security.md).

Each record carries ``seq``, ``prev`` (the previous record's ``hash``) and its own ``hash`` (sha256 of its
canonical JSON without ``hash``). An append takes ``flock`` on the file, reads the last line, and writes the
new line with one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``: workers and the CLI never interleave
or lose records. A crash can only leave a torn final line (no newline): :func:`verify` reports it as a crash
artefact, and the next append ends it with a newline, chains onto the last whole record and names the
fragment's sha256 in ``torn_before``, so the artefact stays explainable and garbage never enters the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bdi.errors import StorageError

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
_TAIL_CHUNK = 4096


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of the record's canonical JSON, ``hash`` itself left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


@dataclass(frozen=True)
class AuditEvent:
    """What happened: who (key id and label), from where, which request and route, which model, and
    the memory fingerprint and threshold before and after."""

    action: str
    outcome: str  # "ok", or the error's class name
    key_id: str = "anonymous"
    key_label: str = "anonymous"
    client: str | None = None
    request_id: str | None = None
    route: str | None = None
    roi: dict[str, str] | None = None  # recipe_id, role_id, roi_id (and model_key for models)
    before: dict[str, Any] | None = None  # {"memory_fingerprint", "threshold"}
    after: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """The audit file of one security folder (``Settings.security_root()``)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / AUDIT_FILE

    def append(self, event: AuditEvent) -> dict[str, Any]:
        """Append one record (time, seq and chain added) durably; returns it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the audit trail {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last, torn = _tail(fd)
            record: dict[str, Any] = {"seq": (last["seq"] + 1) if last else 1, "time": utc_now(),
                                      **_event_fields(event), "prev": last["hash"] if last else GENESIS}
            prefix = b""
            if torn is not None:
                record["torn_before"] = hashlib.sha256(torn).hexdigest()
                prefix = b"\n"  # ends the fragment: it becomes its own line, outside the chain
            record["hash"] = record_hash(record)
            line = prefix + json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n"
            os.write(fd, line)
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot append to the audit trail {self.path}: {exc}") from exc
        finally:
            os.close(fd)  # also releases the flock
        return record

    def records(self) -> Iterator[dict[str, Any]]:
        """The whole records in file order (torn or unparseable lines skipped: :func:`verify` names them)."""
        for _, raw in _lines(self.path):
            parsed = _parse(raw)
            if parsed is not None:
                yield parsed

    def page(self, *, after_seq: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """Up to ``limit`` records with ``seq > after_seq``, and the seq to ask from next (None at the end)."""
        out: list[dict[str, Any]] = []
        for record in self.records():
            if record["seq"] <= after_seq:
                continue
            if len(out) == limit:
                return out, out[-1]["seq"]
            out.append(record)
        return out, None


def _event_fields(event: AuditEvent) -> dict[str, Any]:
    fields = {k: v for k, v in event.__dict__.items() if k != "detail"}
    if event.detail:
        fields["detail"] = event.detail
    return fields


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("seq"), int) and isinstance(record.get("hash"), str)):
        return None
    return record


def _tail(fd: int) -> tuple[dict[str, Any] | None, bytes | None]:
    """(the last whole record, the torn fragment after it or None), reading back from the end."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, None
    data = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        lines = data.split(b"\n")
        # lines[0] may be partial unless we reached the file start; the last is the torn fragment ("" if none)
        candidates = lines if pos == 0 else lines[1:]
        torn = lines[-1] or None
        for raw in reversed(candidates[:-1]):
            record = _parse(raw)
            if record is not None:
                return record, torn
    torn_all = data.rsplit(b"\n", 1)[-1] or None
    return None, torn_all


def _lines(path: Path) -> Iterator[tuple[bool, bytes]]:
    """(ends with a newline, the line's bytes) of every line of the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    parts = data.split(b"\n")
    for i, raw in enumerate(parts):
        last = i == len(parts) - 1
        if last and raw == b"":
            return
        yield (not last), raw


@dataclass(frozen=True)
class Finding:
    """One problem (or crash artefact) of :func:`verify`, at a 1-based line of the file."""

    line: int
    seq: int | None
    kind: str  # "edited", "chain" (removed, moved or replaced), "unreadable", "torn"
    message: str


@dataclass(frozen=True)
class VerifyReport:
    records: int
    head: str  # the last whole record's hash: keep it elsewhere to detect a truncated tail later
    problems: tuple[Finding, ...]
    artefacts: tuple[Finding, ...]  # torn lines a crash left (not tampering)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path) -> VerifyReport:
    """Check every record's hash, its link to the one before and the sequence; name each break."""
    problems: list[Finding] = []
    artefacts: list[Finding] = []
    prev_hash, prev_seq, count = GENESIS, 0, 0
    pending_torn: tuple[int, bytes] | None = None
    for lineno, (ended, raw) in enumerate(_lines(Path(path)), start=1):
        record = _parse(raw)
        if record is None:
            if not ended:
                artefacts.append(Finding(lineno, None, "torn", "a torn final line (a crash mid-append)"))
            else:
                pending_torn = (lineno, raw)
            continue
        if pending_torn is not None:
            torn_line, torn_raw = pending_torn
            if record.get("torn_before") == hashlib.sha256(torn_raw).hexdigest():
                artefacts.append(Finding(torn_line, None, "torn",
                                         f"a torn line (a crash mid-append), closed by record seq {record['seq']}"))
            else:
                problems.append(Finding(torn_line, None, "unreadable", "a line that is not an audit record"))
            pending_torn = None
        count += 1
        seq = record["seq"]
        if record_hash(record) != record["hash"]:
            problems.append(Finding(lineno, seq, "edited", f"record seq {seq} does not match its hash: edited"))
        elif record.get("prev") != prev_hash:
            what = (f"record(s) seq {prev_seq + 1}..{seq - 1} are not before it: removed or moved"
                    if seq > prev_seq + 1 else f"it does not follow record seq {prev_seq}: moved or replaced")
            problems.append(Finding(lineno, seq, "chain", f"record seq {seq} breaks the chain: {what}"))
        elif seq != prev_seq + 1:
            problems.append(Finding(lineno, seq, "chain", f"record seq {seq} follows seq {prev_seq}"))
        prev_hash, prev_seq = record["hash"], seq
    if pending_torn is not None:
        problems.append(Finding(pending_torn[0], None, "unreadable", "a line that is not an audit record"))
    return VerifyReport(records=count, head=prev_hash, problems=tuple(problems), artefacts=tuple(artefacts))
