"""``<models dir>/.calibration_alerts.json``: the stored calibrations whose threshold disables detection.

One small JSON object, model → alert (docs/design.md "Calibrations that detect nothing are flagged"): written by
every calibration (set when its check warns, removed when it does not) under a file lock, and read by ``/health``
in O(1): a stat per call, the file re-read only when it changed (:class:`AlertsReader`). Every worker and replica
on the models dir sees the same alerts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bdi.errors import StorageError
from bdi.storage.fsio import FileIdentity, atomic_write_json, exclusive_lock, read_json_state

ALERTS_FILE = ".calibration_alerts.json"
ALERTS_LOCK_FILE = ".calibration_alerts.lock"
LOCK_TIMEOUT_S = 30.0


def _read(path: Path) -> dict[str, Any]:
    return read_json_state(path, corrupt_event="calibration_alerts.corrupt")


def record_alert(root: Path, *, key: str, alert: Mapping[str, Any] | None) -> None:
    """Set (``alert``) or clear (None) the alert of the model ``key`` in ``root``'s alerts file.

    Raises:
        StorageError: the lock or the write failed.
    """
    path = Path(root) / ALERTS_FILE

    def unusable(exc: OSError) -> StorageError:
        return StorageError(f"cannot update {path}: {exc}")

    if alert is None and key not in _read(path):
        return  # nothing to clear: no lock, no file
    with exclusive_lock(Path(root) / ALERTS_LOCK_FILE, timeout_s=LOCK_TIMEOUT_S,
                        busy=lambda: StorageError(f"timed out waiting for the lock of {path}"), unusable=unusable):
        alerts = _read(path)
        if alert is None:
            alerts.pop(key, None)
        else:
            alerts[key] = dict(alert)
        try:
            atomic_write_json(path, alerts, indent=2)
        except OSError as exc:
            raise unusable(exc) from exc


class AlertsReader:
    """The alerts of one models dir, re-read only when the file changed (one stat per :meth:`read`)."""

    def __init__(self, root: Path) -> None:
        self._path = Path(root) / ALERTS_FILE
        self._lock = threading.Lock()
        self._identity: FileIdentity | None = None
        self._alerts: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        """The alerts, sorted by model key ([] when there is no file)."""
        identity = FileIdentity.of(self._path)
        with self._lock:
            if identity != self._identity:
                alerts = _read(self._path) if identity is not None else {}
                self._alerts = [dict(value, model=key) for key, value in sorted(alerts.items())
                                if isinstance(value, dict)]
                self._identity = identity
            return list(self._alerts)
