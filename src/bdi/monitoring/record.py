"""The inspection record (docs/monitoring.md "The inspection record"): one JSON line per ``/infer`` decision in
``<models dir>/_inspections/``.

Every process appends to its own segment file, ``seg-<UTC start>-<pid>-<n>.jsonl``, so no lock is shared between
workers on the request path: each record is one ``os.write`` of one line on an ``O_APPEND`` descriptor (threads of
one process never interleave either). Readers merge the segments and sort by time. A segment is closed and a new
one opened when it reaches ``segment_max_bytes`` or ``segment_max_age_s``; segments (and stored images) older than
``retention_days`` are deleted when a writer rotates.

There is no fsync per line, on purpose: the record is diagnostics, not the decision itself, and an fsync would
cost more than the whole record. A ``write()`` that returned is in the kernel's page cache and survives the
death of the process (SIGKILL included), so every answered request is on disk; only a machine crash can lose
the last seconds. A line torn by a crash of the machine, or a segment cut short, is skipped when read, never an
error.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bdi.errors import InvalidInputError
from bdi.logging import slog
from bdi.storage.fsio import atomic_write_bytes

INSPECTIONS_DIRNAME = "_inspections"
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jsonl"
IMAGES_DIRNAME = "images"
RECORD_VERSION = 1
DECISIONS = ("ok", "ng")


def inspections_dir(models_dir: Path) -> Path:
    """``<models dir>/_inspections``: the record, beside the models it describes."""
    return Path(models_dir) / INSPECTIONS_DIRNAME


@dataclass(frozen=True)
class InspectionRecord:
    """One ``/infer`` decision. Flat, so that a CSV or Parquet export has one column per field (``timings_ms``
    becomes ``timing_<stage>_ms`` columns).

    ``memory_fingerprint`` identifies the memory that scored; ``registered_*`` are set when the model came from
    the registry (bdi.storage.lineage). ``brightness``/``contrast``/``sharpness`` are bdi.monitoring.imagestats'.
    ``image_file`` is the stored copy of the image (relative to the record folder) when images are kept.
    """

    id: str
    ts: str  # UTC ISO 8601 with microseconds and "Z": sorts as time
    request_id: str | None
    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str
    memory_fingerprint: str | None
    registered_model: str | None
    registered_version: int | None
    registered_alias: str | None
    score: float
    threshold: float
    decision: str
    mm_per_px: float
    n_regions: int
    largest_region_mm2: float | None
    image_sha256: str
    image_bytes: int
    width: int
    height: int
    brightness: float
    contrast: float
    sharpness: float
    review: bool = False  # the score fell in the calibration's OK / review / NG band (``decision``: review_decision)
    threshold_low: float | None = None  # the band's thresholds; None without a band
    threshold_high: float | None = None
    image_file: str | None = None
    shape_json: str | None = None  # the ROI shape the request masked the crop with (JSON text), if any
    pid: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    v: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (a shallow copy: cheaper than ``asdict``'s deep one, on the /infer path)."""
        body = {name: getattr(self, name) for name in _FIELD_NAMES}
        body["timings_ms"] = dict(self.timings_ms)
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InspectionRecord | None:
        """A record read back; None when the object lacks a required field (another writer's line, damage)."""
        values = {k: v for k, v in data.items() if k in _FIELD_NAMES}
        try:
            record = cls(**values)
        except TypeError:
            return None
        if not isinstance(record.ts, str) or not isinstance(record.id, str):
            return None
        return record

    def flat(self) -> dict[str, Any]:
        """The record as one table row: ``timings_ms`` spread into ``timing_<stage>_ms`` columns."""
        row = {k: v for k, v in self.to_dict().items() if k != "timings_ms"}
        for stage, ms in sorted(self.timings_ms.items()):
            row[f"timing_{stage}_ms"] = ms
        return row


_FIELD_NAMES = frozenset(f.name for f in fields(InspectionRecord))


@dataclass(frozen=True)
class RecordPolicy:
    """How the record is kept (the ``inspections_*`` settings, docs/configuration.md)."""

    segment_max_bytes: int = 16 * 1024 * 1024
    segment_max_age_s: float = 24 * 3600.0
    retention_days: float = 30.0
    store_images: bool = False
    image_max_bytes: int = 4 * 1024 * 1024


class InspectionLog:
    """This process's writer of the record (one per service). Not fork-shared: a forked child opens its own
    segment on its first write (the pid is checked)."""

    def __init__(self, root: Path, policy: RecordPolicy | None = None) -> None:
        self.root = Path(root)
        self.policy = policy or RecordPolicy()
        self._lock = threading.Lock()  # this process's threads only: rotation swaps the descriptor
        self._fd: int | None = None
        self._pid = 0
        self._opened_at = 0.0
        self._size = 0
        self._n = 0

    def append(self, record: InspectionRecord) -> None:
        """Append one record as one line (one ``os.write``; no fsync: see the module docstring).

        Raises:
            OSError: the folder or the segment cannot be written (callers log it; a request never fails on it).
        """
        line = (json.dumps(record.to_dict(), separators=(",", ":"), allow_nan=False, default=str) + "\n").encode()
        with self._lock:
            fd = self._segment(len(line))
            written = os.write(fd, line)
            self._size += written

    def store_image(self, image: bytes, *, sha256: str, suffix: str) -> str | None:
        """Keep a copy of the image (content-addressed, written once) when images are kept and it is within the
        size cap; its path relative to the record folder, else None."""
        if not self.policy.store_images or len(image) > self.policy.image_max_bytes:
            return None
        relative = f"{IMAGES_DIRNAME}/{sha256[:2]}/{sha256}{suffix}"
        path = self.root / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, image)
        return relative

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _segment(self, incoming: int) -> int:
        now = time.time()
        stale = (self._fd is None or self._pid != os.getpid()
                 or self._size + incoming > self.policy.segment_max_bytes and self._size > 0
                 or now - self._opened_at > self.policy.segment_max_age_s)
        if not stale:
            assert self._fd is not None
            return self._fd
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._pid, self._opened_at, self._size = os.getpid(), now, 0
        self._n += 1
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{SEGMENT_PREFIX}{stamp}-{self._pid}-{self._n}{SEGMENT_SUFFIX}"
        self._fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        remove_expired(self.root, retention_days=self.policy.retention_days, now=now)
        return self._fd


def remove_expired(root: Path, *, retention_days: float, now: float | None = None) -> int:
    """Delete the segments and stored images last written more than ``retention_days`` ago; how many.
    A writer's open segment is younger (the segment age limit is below the retention)."""
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    removed = 0
    candidates = [*root.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"), *root.glob(f"{IMAGES_DIRNAME}/*/*")]
    for path in candidates:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue  # another process removed it first
    if removed:
        slog("inspections.expired", removed=removed, retention_days=retention_days)
    return removed


def segments(root: Path) -> list[Path]:
    """The segment files of the record, by name (start time, then pid)."""
    return sorted(Path(root).glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))


def iter_segment(path: Path) -> Iterator[InspectionRecord]:
    """The records of one segment; a torn or foreign line (a crash mid-write, damage) is skipped."""
    try:
        data = path.read_bytes()
    except OSError:
        return  # removed by retention meanwhile
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict):
            record = InspectionRecord.from_dict(obj)
            if record is not None:
                yield record


@dataclass(frozen=True)
class InspectionQuery:
    """A filter of the record (``GET /inspections``): every given field must match; ``since`` is an ISO time
    (records at or after it); ``cursor`` the ``next_cursor`` of the previous page."""

    recipe_id: str | None = None
    role_id: str | None = None
    roi_id: str | None = None
    model_key: str | None = None
    memory_fingerprint: str | None = None
    decision: str | None = None
    since: str | None = None
    limit: int = 100
    cursor: str | None = None

    def __post_init__(self) -> None:
        if self.decision is not None and self.decision not in DECISIONS:
            raise InvalidInputError(f"decision must be one of {list(DECISIONS)}, got {self.decision!r}")
        if self.limit < 1:
            raise InvalidInputError(f"limit must be >= 1, got {self.limit}")
        if self.since is not None:
            object.__setattr__(self, "since", normalize_time(self.since))

    def matches(self, record: InspectionRecord) -> bool:
        for name in ("recipe_id", "role_id", "roi_id", "model_key", "memory_fingerprint", "decision"):
            wanted = getattr(self, name)
            if wanted is not None and getattr(record, name) != wanted:
                return False
        return self.since is None or record.ts >= self.since


@dataclass(frozen=True)
class InspectionPage:
    records: list[InspectionRecord]
    next_cursor: str | None  # None: this was the last page


def normalize_time(value: str) -> str:
    """An ISO 8601 time (a date alone, or with a zone) as the record's UTC form, so it compares with ``ts``."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInputError(f"since must be an ISO 8601 time, got {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def _sort_key(record: InspectionRecord) -> tuple[str, str]:
    return record.ts, record.id


def encode_cursor(record: InspectionRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([record.ts, record.id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        ts, rid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidInputError(f"invalid cursor {cursor!r}") from exc
    if not isinstance(ts, str) or not isinstance(rid, str):
        raise InvalidInputError(f"invalid cursor {cursor!r}")
    return ts, rid


def read_records(root: Path, query: InspectionQuery | None = None) -> list[InspectionRecord]:
    """Every matching record of every segment, newest first (ties by id). Reads the whole record: fine for the
    retention's millions of lines at most; docs/monitoring.md "Limits"."""
    query = query or InspectionQuery()
    out = [r for path in segments(root) for r in iter_segment(path) if query.matches(r)]
    out.sort(key=_sort_key, reverse=True)
    return out


def query_records(root: Path, query: InspectionQuery) -> InspectionPage:
    """One page of :func:`read_records`, after ``query.cursor``."""
    records = read_records(root, query)
    if query.cursor is not None:
        after = decode_cursor(query.cursor)
        records = [r for r in records if _sort_key(r) < after]
    page = records[: query.limit]
    more = len(records) > query.limit
    return InspectionPage(records=page, next_cursor=encode_cursor(page[-1]) if more and page else None)


def new_record_id() -> str:
    return uuid.uuid4().hex
