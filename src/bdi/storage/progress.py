"""``<models dir>/.progress/<digest of the model's ids>.json``: how far the running fit or calibration of a model is.

Written by the worker that runs the job (:class:`ProgressTracker`, the service's progress callback: encode,
coreset, scoring...) and read by any worker (``GET /progress``): a file, not process memory, because the
request that polls may reach another uvicorn worker or replica on the same models dir. Each write replaces the
file atomically; writes are throttled, and a failed write is logged, never fails the job it reports on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bdi.errors import StorageError
from bdi.logging import slog
from bdi.refs import ModelRef
from bdi.storage.fsio import atomic_write_json, read_json, utc_now_iso

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total), as bdi.patchcore.model's
PROGRESS_DIR = ".progress"
JOBS = ("fit", "calibrate")
STATES = ("running", "done", "failed")
MIN_INTERVAL_S = 0.2  # between two writes of the same stage (a stage's first and last counts are always written)


class ProgressStore:
    """The progress files of the models under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, ref: ModelRef) -> Path:
        digest = hashlib.sha256(json.dumps(ref.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()[:32]
        return self.root / PROGRESS_DIR / f"{digest}.json"

    def tracker(self, ref: ModelRef, job: str, *, forward: ProgressFn | None = None) -> ProgressTracker:
        """A tracker of the job ``job`` ("fit", "calibrate") of ``ref`` that also calls ``forward``; it writes
        nothing until it is called."""
        return ProgressTracker(self.path(ref), job=job, forward=forward)

    def read(self, ref: ModelRef) -> dict[str, Any] | None:
        """The last progress written for ``ref``; None when there is none or it is unreadable."""
        try:
            value = read_json(self.path(ref))
        except ValueError:
            return None
        return value if _well_formed(value) else None  # absent, hand-edited or foreign: "no progress"


class ProgressTracker:
    """``tracker(stage, done, total)`` records a job's progress (a ``bdi.patchcore.model.ProgressFn``);
    :meth:`finish` its end. Every stage seen keeps its last ``[done, total]``."""

    def __init__(self, path: Path, *, job: str, forward: ProgressFn | None = None) -> None:
        self.path = path
        self._forward = forward
        self._doc: dict[str, Any] = {"job": job, "state": "running", "stage": None, "done": 0, "total": 0,
                                     "stages": {}, "started_at_utc": None, "updated_at_utc": None, "error": None}
        self._last_write = 0.0

    @property
    def started(self) -> bool:
        return self._doc["started_at_utc"] is not None

    def __call__(self, stage: str, done: int, total: int) -> None:
        doc = self._doc
        new_stage = stage != doc["stage"]
        if not self.started:
            doc["started_at_utc"] = utc_now_iso()
        doc.update(stage=stage, done=int(done), total=int(total))
        doc["stages"][stage] = [int(done), int(total)]
        if new_stage or done >= total or time.monotonic() - self._last_write >= MIN_INTERVAL_S:
            self._write()
        if self._forward is not None:
            self._forward(stage, done, total)

    def finish(self, *, error: BaseException | None = None) -> None:
        """Mark the job ``done`` (or ``failed`` with the error's text); nothing when it never started, so that a
        job refused before its work (a fit waiting on another's lock) leaves the running one's progress alone."""
        if not self.started:
            return
        self._doc.update(state="failed" if error is not None else "done", error=str(error) if error else None)
        self._write()

    def _write(self) -> None:
        self._doc["updated_at_utc"] = utc_now_iso()
        self._last_write = time.monotonic()
        try:
            atomic_write_json(self.path, self._doc, indent=0)
        except StorageError as exc:
            slog("progress.write_failed", path=str(self.path), error=str(exc))


def _well_formed(value: Any) -> bool:
    """Whether ``value`` is a progress document as :class:`ProgressTracker` writes it."""
    return (isinstance(value, dict) and value.get("job") in JOBS and value.get("state") in STATES
            and isinstance(value.get("done"), int) and isinstance(value.get("total"), int)
            and isinstance(value.get("stages"), dict))
