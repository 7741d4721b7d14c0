"""One model's files change together: a readers/writer lock per model folder, across processes.

A registry sync replaces a model's memory, index, calibration and lineage sidecar as one change; each
file is replaced atomically, but a request between two replacements would pair a new memory with the
old calibration (and answer ``calibration_missing``). So the sync holds the model's lock *exclusively*
while it replaces the four files, and readers (``/infer``, ``/state``, ``/manifest``) hold it *shared*
while they load them: a reader sees all old files or all new ones. The lock is ``flock(2)`` on
``<model dir>/.<base>.rwlock`` (POSIX; per open file description, so threads of one process exclude
each other too). Readers hold it for a load only (cache hits are a few stats), never while scoring.

Readers never fail because of the lock: a folder that does not exist yet, a read-only models volume or a
writer that takes too long (``READ_TIMEOUT_S``) means the load goes on unlocked, as before this lock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bdi.errors import StorageError
from bdi.logging import slog
from bdi.refs import ModelRef
from bdi.storage.store import ModelStore

try:  # POSIX only; elsewhere the lock is a no-op (the server runs on Linux)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

READ_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 60.0
_POLL_S = 0.005


def lock_path(store: ModelStore, ref: ModelRef) -> Path:
    return store.paths(ref).memory.with_name(f".{ref.base}.rwlock")


def _acquire(fd: int, *, exclusive: bool, timeout_s: float) -> bool:
    assert fcntl is not None
    flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout_s
    delay = _POLL_S
    while True:
        try:
            fcntl.flock(fd, flags)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


@contextmanager
def reading(store: ModelStore, ref: ModelRef, *, timeout_s: float = READ_TIMEOUT_S) -> Iterator[None]:
    """Hold ``ref``'s lock shared for the block (best effort, see the module docstring)."""
    path = lock_path(store, ref)
    fd = -1
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            try:  # the folder exists but no writer has made the lock file yet
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666) if path.parent.is_dir() else -1
            except OSError:
                fd = -1
        except OSError:
            fd = -1
    try:
        if fd >= 0 and not _acquire(fd, exclusive=False, timeout_s=timeout_s):
            slog("model_lock.read_timeout", path=str(path), timeout_s=timeout_s, model_key=ref.model_key)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def writing(store: ModelStore, ref: ModelRef, *, timeout_s: float = WRITE_TIMEOUT_S) -> Iterator[None]:
    """Hold ``ref``'s lock exclusively for the block (creates the model folder).

    Raises:
        StorageError: the lock could not be taken within ``timeout_s`` or the folder is not writable.
    """
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    path = lock_path(store, ref)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StorageError(f"cannot open the model lock {path}: {exc}") from exc
    try:
        if not _acquire(fd, exclusive=True, timeout_s=timeout_s):
            raise StorageError(f"timed out after {timeout_s:.0f} s waiting for the model lock {path}")
        yield
    finally:
        os.close(fd)
