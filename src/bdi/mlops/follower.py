"""Serving follows the registry: a loop that keeps a models dir equal to the registry's alias holders.

:class:`RegistryFollower` runs :func:`bdi.mlops.registry_sync.sync_registry` every ``interval_s`` seconds, in a
background thread of the server (``BDI_REGISTRY_SYNC_ON_START=1``, interval
``BDI_REGISTRY_SYNC_INTERVAL_S``) or in the foreground as a sidecar (``bdi sync --watch``); both are
this one loop. Of all the processes following one models dir (uvicorn workers, a sidecar) only the
holder of ``.registry_watch.lock`` polls the registry; the others wait to take over.

After every attempt the follower writes ``<models dir>/.registry_sync.json`` (atomically): when the
registry was last reached, the last error, and the versions now held. ``/health`` of every worker
reads it (:class:`SyncStatusReader`, cached by file identity), so it reports how stale the registry
view is even when the registry is down (the server goes on serving what it has) and whichever process
syncs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from bdi.errors import StorageError
from bdi.logging import slog
from bdi.mlops.registry_sync import SyncReport, sync_registry
from bdi.mlops.shadow import shadow_models_dir
from bdi.mlops.tracking import TrackingTarget
from bdi.security.audit import AuditEvent, AuditLog
from bdi.storage.fsio import FileIdentity, atomic_write_json

STATUS_FILE = ".registry_sync.json"
LEADER_LOCK_FILE = ".registry_watch.lock"
MAX_ERROR_CHARS = 500


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# What MLflow code the server's background threads run (the registry follower, the start-up check, API
# run logging). Imported once, in one thread, before those threads start: two threads importing mlflow
# for the first time at once can deadlock on its circular imports, and Python then leaves a half-built
# `mlflow` module in sys.modules for the life of the process (every later sync fails).
MLFLOW_MODULES = ("mlflow", "mlflow.artifacts", "mlflow.exceptions", "mlflow.models", "mlflow.entities",
                  "mlflow.tracking", "mlflow.store.artifact.artifact_repository_registry")


def preload_mlflow() -> None:
    """Import :data:`MLFLOW_MODULES` in the calling thread (call before starting MLflow threads)."""
    import importlib

    for name in MLFLOW_MODULES:
        importlib.import_module(name)


def status_path(models_dir: Path) -> Path:
    return Path(models_dir) / STATUS_FILE


def read_status(models_dir: Path) -> dict[str, Any] | None:
    """The status file's content, or None when absent or unreadable."""
    try:
        data = json.loads(status_path(models_dir).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _held_entries(report: SyncReport) -> list[dict[str, Any]]:
    return [{"name": m.name, "version": m.version, "alias": m.alias, "recipe_id": m.ref.recipe_id,
             "role_id": m.ref.role_id, "roi_id": m.ref.roi_id, "model_key": m.ref.model_key,
             "memory_fingerprint": m.fingerprint} for m in report.held]


def _threshold(calib_path: Path) -> float | None:
    try:
        value = json.loads(calib_path.read_text(encoding="utf-8")).get("threshold")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def audit_changes(audit: AuditLog, report: SyncReport, *, previous: Mapping[str, Any] | None) -> None:
    """One audit record (key ``registry``) per model the sync swapped: the version and fingerprint before and after."""
    held_before = {(m.get("recipe_id"), m.get("role_id"), m.get("roi_id"), m.get("model_key")): m
                   for m in (previous or {}).get("models") or [] if isinstance(m, dict)}
    for m in report.changed:
        ref = m.ref
        before = held_before.get((ref.recipe_id, ref.role_id, ref.roi_id, ref.model_key), {})
        audit.append(AuditEvent(
            action="registry.sync", outcome="ok", key_id="registry", key_label=f"registry @{m.alias}",
            client=None, route=None,
            roi={"recipe_id": ref.recipe_id, "role_id": ref.role_id, "roi_id": ref.roi_id, "model_key": ref.model_key},
            before={"memory_fingerprint": before.get("memory_fingerprint"), "version": before.get("version")},
            after={"memory_fingerprint": m.fingerprint, "threshold": _threshold(m.paths.calib), "version": m.version},
            detail={"name": m.name, "written": list(m.written)},
        ))


def sync_once(
    *, tracking: TrackingTarget, models_dir: Path, alias: str, interval_s: float,
    previous: Mapping[str, Any] | None = None, exports_root: Path | None = None, audit: AuditLog | None = None,
) -> dict[str, Any]:
    """One sync attempt, recorded in the status file; returns the status written.

    A failure (registry unreachable, a broken version) is recorded and logged, never raised: the
    models dir keeps what it has and the status keeps the last success.
    """
    started = time.time()
    report: SyncReport | None = None
    status: dict[str, Any] = dict(previous or {})
    status.update({"alias": alias, "interval_s": interval_s, "pid": os.getpid(),
                   "last_attempt_unix": started, "last_attempt_utc": _iso(started)})
    try:
        report = sync_registry(tracking=tracking, models_dir=models_dir, alias=alias,
                               exports_root=exports_root)
    except Exception as exc:  # noqa: BLE001 - a failed sync must never stop serving; it is reported
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_ERROR_CHARS]
        status["error"] = message
        slog("registry.sync_failed", error=message, alias=alias)
    else:
        done = time.time()
        # a holder that failed this time (a broken version, or the registry going away mid-sync) keeps
        # its entry of the last sync: its files were not touched and are still what is served
        failed = {f.name for f in report.failed}
        kept = [m for m in status.get("models") or [] if isinstance(m, dict) and m.get("name") in failed]
        status.update({"error": None, "last_success_unix": done, "last_success_utc": _iso(done),
                       "models": kept + _held_entries(report), "failed": [str(f) for f in report.failed]})
        if report.changed or report.released:
            slog("registry.sync", alias=alias, changed=[f"{m.name}@{m.version}" for m in report.changed],
                 released=list(report.released))
    try:
        atomic_write_json(status_path(models_dir), status, indent=2)
    except Exception as exc:  # noqa: BLE001 - a read-only or full disk must not stop the loop
        slog("registry.status_write_failed", error=str(exc))
    if audit is not None and report is not None and report.changed:  # after the status: /health sees the swap first
        try:
            audit_changes(audit, report, previous=previous)
        except StorageError as exc:  # the models were swapped: say loudly that the record is missing
            slog("registry.audit_failed", level="error", error=str(exc))
    return status


class RegistryFollower:
    """The sync loop over one models dir (see the module docstring). ``interval_s`` 0 = one sync only."""

    def __init__(
        self, *, tracking: TrackingTarget, models_dir: Path, interval_s: float,
        alias: str | None = None, exports_root: Path | None = None, shadow_alias: str = "",
        audit: AuditLog | None = None,
    ) -> None:
        """``shadow_alias``: also sync that alias's holders into ``shadow/<alias>`` (``bdi.mlops.shadow``);
        ``audit``: record every model swapped into ``models_dir`` (key ``registry``, docs/security.md)."""
        self.audit = audit
        self.tracking = tracking
        self.exports_root = exports_root  # where synced versions' feature-net exports are copied
        self.models_dir = Path(models_dir)
        self.interval_s = float(interval_s)
        self.alias = alias or tracking.alias
        self._stop = threading.Event()
        self._first_attempt = threading.Event()
        self._thread: threading.Thread | None = None
        self._status: dict[str, Any] | None = None
        self.shadow_alias = shadow_alias
        self._shadow_status: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, wait_first_s: float) -> None:
        """Start the loop in a daemon thread; wait up to ``wait_first_s`` for its first attempt (when
        this process leads), so a server starting on an empty models dir serves at once."""
        self._thread = threading.Thread(target=self.run, name="bdi-registry-sync", daemon=True)
        self._thread.start()
        if not self._first_attempt.wait(timeout=max(0.0, wait_first_s)):
            slog("registry.first_sync_pending", waited_s=wait_first_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def run(self) -> None:
        """The loop (blocking): lead or wait, sync every interval, until :meth:`stop`."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        leader = FileLock(str(self.models_dir / LEADER_LOCK_FILE), timeout=0)
        leading = False
        try:
            while not self._stop.is_set():
                if not leading:
                    try:
                        leader.acquire()
                        leading = True
                        if self._status is None:  # keep the last success of an earlier follower
                            self._status = read_status(self.models_dir)
                        slog("registry.follow", models_dir=str(self.models_dir), alias=self.alias,
                             interval_s=self.interval_s)
                    except Timeout:
                        self._first_attempt.set()  # another process syncs this models dir
                if leading:
                    self._status = sync_once(tracking=self.tracking,
                                             models_dir=self.models_dir, alias=self.alias,
                                             interval_s=self.interval_s, previous=self._status,
                                             exports_root=self.exports_root, audit=self.audit)
                    if self.shadow_alias:
                        self._shadow_status = sync_once(
                            tracking=self.tracking,
                            models_dir=shadow_models_dir(self.models_dir, self.shadow_alias), alias=self.shadow_alias,
                            interval_s=self.interval_s, previous=self._shadow_status, exports_root=self.exports_root,
                        )
                    self._first_attempt.set()
                    if self.interval_s <= 0:
                        return
                self._stop.wait(self.interval_s if self.interval_s > 0 else 1.0)
        finally:
            if leading:
                leader.release()


class SyncStatusReader:
    """``/health``'s registry section from the status file (re-read only when the file changed)."""

    def __init__(self, models_dir: Path, *, following: bool, alias: str, interval_s: float) -> None:
        self.path = status_path(models_dir)
        self.following = following
        self.alias = alias
        self.interval_s = interval_s
        self._cached: tuple[FileIdentity | None, dict[str, Any] | None] = (None, None)

    def _read(self) -> dict[str, Any] | None:
        ident = FileIdentity.of(self.path)
        if ident is None:
            return None
        cached_ident, cached = self._cached
        if cached_ident == ident:
            return cached
        value = read_status(self.path.parent)
        self._cached = (ident, value)
        return value

    def health(self, *, now: float | None = None) -> dict[str, Any]:
        """``following``, ``alias``, ``interval_s``, ``last_sync_utc``, ``stale_s`` (seconds since the
        registry was last reached), ``reachable`` (the last attempt reached it), ``error``, ``synced`` and
        ``failed`` (alias holders that could not be synced, with why)."""
        status = self._read()
        now = time.time() if now is None else now
        if status is None:
            return {"following": self.following, "alias": self.alias, "interval_s": self.interval_s,
                    "last_sync_utc": None, "last_attempt_utc": None, "stale_s": None, "reachable": None,
                    "error": None, "synced": [], "failed": []}
        success = status.get("last_success_unix")
        return {
            "following": True,
            "alias": status.get("alias", self.alias),
            "interval_s": status.get("interval_s", self.interval_s),
            "last_sync_utc": status.get("last_success_utc"),
            "last_attempt_utc": status.get("last_attempt_utc"),
            "stale_s": round(now - float(success), 3) if isinstance(success, (int, float)) else None,
            "reachable": status.get("error") is None,
            "error": status.get("error"),
            "synced": list(status.get("models") or []),
            "failed": list(status.get("failed") or []),  # versions the registry holds that could not be synced
        }
