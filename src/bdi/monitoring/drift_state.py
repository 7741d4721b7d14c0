"""``<models dir>/_inspections/drift_state.json``: each model's last drift status and since when it holds.

Written after each evaluation under a file lock (not on the ``/infer`` path), so ``since`` is the same from every
worker and survives restarts: a status that did not change keeps its ``since``. ``/health`` reads it in O(1) (a stat
per call, re-read only when it changed: :class:`DriftStateReader`) and warns for every model in alarm.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bdi.errors import StorageError
from bdi.monitoring.drift import ALARM, RoiDrift
from bdi.storage.fsio import (
    FileIdentity,
    atomic_write_json,
    exclusive_lock,
    read_json_state,
    utc_now_iso,
)

STATE_FILE = "drift_state.json"
STATE_LOCK_FILE = "drift_state.lock"
LOCK_TIMEOUT_S = 30.0


def _read(path: Path) -> dict[str, Any]:
    return read_json_state(path, corrupt_event="drift_state.corrupt")


def persist_statuses(root: Path, drifts: Sequence[RoiDrift], *, now: str | None = None) -> list[RoiDrift]:
    """Record the statuses of ``drifts`` in ``root``'s state file; the drifts with their ``since`` (kept from the
    file while the status is unchanged, else ``now``).

    Raises:
        StorageError: the lock or the write failed.
    """
    path = Path(root) / STATE_FILE
    stamp = now or utc_now_iso()

    def unusable(exc: OSError) -> StorageError:
        return StorageError(f"cannot update {path}: {exc}")

    with exclusive_lock(Path(root) / STATE_LOCK_FILE, timeout_s=LOCK_TIMEOUT_S,
                        busy=lambda: StorageError(f"timed out waiting for the lock of {path}"), unusable=unusable):
        state = _read(path)
        out: list[RoiDrift] = []
        for drift in drifts:
            previous = state.get(drift.key)
            same = (isinstance(previous, dict) and previous.get("status") == drift.status
                    and previous.get("memory_fingerprint") == drift.memory_fingerprint)
            since = str(previous["since"]) if same and isinstance(previous, dict) and previous.get("since") else stamp
            state[drift.key] = {"recipe_id": drift.recipe_id, "role_id": drift.role_id, "roi_id": drift.roi_id,
                                "model_key": drift.model_key, "memory_fingerprint": drift.memory_fingerprint,
                                "status": drift.status, "cause": drift.cause, "since": since}
            out.append(replace(drift, since=since))
        if state != _read(path):  # written only when a status (or cause) changed: /health re-reads it then
            try:
                atomic_write_json(path, state, indent=2)
            except OSError as exc:
                raise unusable(exc) from exc
    return out


class DriftStateReader:
    """The models in alarm, re-read only when the state file changed (one stat per :meth:`alarms`)."""

    def __init__(self, root: Path) -> None:
        self._path = Path(root) / STATE_FILE
        self._lock = threading.Lock()
        self._identity: FileIdentity | None = None
        self._alarms: list[dict[str, Any]] = []

    def alarms(self) -> list[dict[str, Any]]:
        """``{"kind": "drift", recipe/role/roi/model_key, cause, since}`` of every model in alarm, by key."""
        identity = FileIdentity.of(self._path)
        with self._lock:
            if identity != self._identity:
                state = _read(self._path) if identity is not None else {}
                self._alarms = [
                    {"kind": "drift", **{k: value.get(k) for k in ("recipe_id", "role_id", "roi_id", "model_key",
                                                                    "status", "cause", "since")}}
                    for _, value in sorted(state.items()) if isinstance(value, dict) and value.get("status") == ALARM
                ]
                self._identity = identity
            return [dict(alarm) for alarm in self._alarms]
