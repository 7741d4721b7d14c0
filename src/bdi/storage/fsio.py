"""Crash-safe file IO: atomic writes (temp file + fsync + ``os.replace``), folders swapped in whole,
orphan temp-file cleanup, reads that report the identity of the very file read, and the UTC
timestamps written into files."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat as stat_mod
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from filelock import FileLock, Timeout

from bdi.errors import InvalidInputError, StorageError
from bdi.logging import slog

_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.tmp")


@dataclass(frozen=True)
class FileIdentity:
    """What a cache entry is keyed by: a changed file (new inode, mtime or size) is a cache miss."""

    path: Path
    mtime_ns: int
    size: int
    inode: int = 0

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        """The identity of a regular file, or None when it does not exist (or is not a file)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls._from_stat(path, st)

    @classmethod
    def _from_stat(cls, path: Path, st: os.stat_result) -> FileIdentity | None:
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return cls(path=Path(path), mtime_ns=st.st_mtime_ns, size=st.st_size, inode=st.st_ino)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def write_temp_file(directory: Path, data: bytes) -> Path:
    """A new hidden temp file in ``directory`` holding ``data``, fsynced (mode 0o666 & ~umask)."""
    tmp = directory / f".{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def remove_orphan_temp_files(root: Path, *, older_than_s: float, now: float | None = None) -> list[Path]:
    """Delete the temp files :func:`write_temp_file` left under ``root`` (a writer killed between
    writing and ``os.replace``) once they are older than ``older_than_s``; younger ones may belong to a
    write in progress in another worker. Returns what was removed; unreadable dirs are skipped."""
    cutoff = (time.time() if now is None else now) - older_than_s
    removed: list[Path] = []
    for directory, _, names in os.walk(root):
        for name in names:
            if not _TEMP_NAME.fullmatch(name):
                continue
            path = Path(directory) / name
            try:
                if path.lstat().st_mtime <= cutoff and stat_mod.S_ISREG(path.lstat().st_mode):
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue  # vanished meanwhile, or not ours to delete
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, ``os.replace``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = write_temp_file(path.parent, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
    fsync_dir(path.parent)



@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Build the folder ``final`` elsewhere: yields a fresh sibling path (not yet created) that replaces
    ``final`` when the block succeeds (the old folder is removed first); on failure ``final`` is left
    as it was and the staged folder is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield staged
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def json_default(obj: Any) -> Any:
    """numpy scalars/arrays → Python values, paths → str; anything else is not JSON."""
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: Path, obj: Any, *, indent: int = 2) -> None:
    """Atomically write ``obj`` as UTF-8 JSON (numpy values converted)."""
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False, default=json_default)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"not JSON-serialisable for {Path(path).name}: {exc}") from exc
    atomic_write_bytes(path, text.encode("utf-8"))


# How often a reader resolves and reads a file again when it was replaced or removed in between (ModelStore's
# memories and indexes, CalibrationFiles' documents).
TORN_READ_RETRIES = 5


def read_with_identity(path: Path) -> tuple[bytes, FileIdentity] | None:
    """The bytes of ``path`` and the identity of the very file read (fstat on the open descriptor)."""
    try:
        with open(path, "rb") as fh:
            ident = FileIdentity._from_stat(path, os.fstat(fh.fileno()))
            if ident is None:
                return None
            data = fh.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    return data, ident


ABSENT: Final = object()  # what read_json gives for a missing file (JSON itself can be null)


def read_json(path: Path) -> Any:
    """The decoded JSON of ``path``, :data:`ABSENT` when there is no such file.

    Raises:
        ValueError: the file is not UTF-8 JSON (``UnicodeDecodeError`` / ``json.JSONDecodeError``); each caller
            decides whether that is an error or a file to rebuild.
        StorageError: the file exists but cannot be read.
    """
    read = read_with_identity(path)
    if read is None:
        return ABSENT
    return json.loads(read[0].decode("utf-8"))


def read_json_state(path: Path, *, corrupt_event: str) -> dict[str, Any]:
    """The JSON object of a state file that is rebuilt, never trusted (alerts, drift state): ``{}`` when the
    file is absent, and also when it is corrupt or not an object (logged as ``corrupt_event``)."""
    try:
        value = read_json(path)
    except ValueError as exc:
        slog(corrupt_event, path=str(path), error=str(exc))
        return {}
    return value if isinstance(value, dict) else {}


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


@contextmanager
def exclusive_lock(
    lock_file: Path, *, timeout_s: float, busy: Callable[[], Exception], unusable: Callable[[OSError], Exception]
) -> Iterator[None]:
    """Hold an inter-process lock on ``lock_file`` (``filelock``: ``flock`` on POSIX, so the kernel drops it when
    its holder dies) for the block, creating its folder first.

    Raises:
        ``busy()``: the lock was not obtained within ``timeout_s``.
        ``unusable(exc)``: the folder or the lock file cannot be created or opened.
    """
    lock = FileLock(str(lock_file), timeout=timeout_s)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout as exc:  # a TimeoutError, so an OSError: caught first
        raise busy() from exc
    except OSError as exc:
        raise unusable(exc) from exc
    try:
        yield
    finally:
        lock.release()
