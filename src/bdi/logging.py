"""Structured diagnostics: one JSON object per line in ``backend_diagnostics.jsonl``.

The file and its line format: docs/contract.md "Diagnostics log".

``slog(event, **fields)`` appends ``{"ts", "event", "pid", "thread", <context ids>, <fields>}``.
The ids (request_id, recipe_id, role_id, roi_id) come from :func:`bind_context` when the event does
not pass them itself. Each line is written with a single ``os.write`` on an ``O_APPEND`` descriptor,
so lines from threads and processes never interleave. Every event is mirrored to the stdlib logger
``"bdi"`` at DEBUG. Logging never raises into the caller.

The only module state is the sink path chosen by :func:`configure_logging`; it affects where lines
go, never what the library computes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any

LOG_FILE_NAME = "backend_diagnostics.jsonl"
CONTEXT_KEYS: tuple[str, ...] = ("request_id", "recipe_id", "role_id", "roi_id")
_BASE_KEYS = frozenset({"ts", "event", "pid", "thread"})

_std_log = logging.getLogger("bdi")

_CONTEXT: dict[str, ContextVar[str | None]] = {
    key: ContextVar(f"bdi_log_{key}", default=None) for key in CONTEXT_KEYS
}

_sink_lock = threading.Lock()
_sink_path: Path | None = None


class ContextBinding:
    """The tokens of one :func:`bind_context` call. Use as a context manager or call :meth:`reset`."""

    def __init__(self, tokens: Mapping[str, Token[str | None]]) -> None:
        self._tokens = dict(tokens)

    def reset(self) -> None:
        """Restore the ids that were bound before this binding (idempotent)."""
        for key, token in reversed(list(self._tokens.items())):
            _CONTEXT[key].reset(token)
        self._tokens.clear()

    def __enter__(self) -> ContextBinding:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reset()


def bind_context(**ids: object) -> ContextBinding:
    """Set request_id / recipe_id / role_id / roi_id for the current context (task or thread).

    Unknown keys raise ``TypeError``; ``None`` unbinds a key. Returns a binding to reset them::

        with bind_context(request_id=rid, recipe_id="default"):
            slog("infer.request", ...)
    """
    unknown = sorted(set(ids) - set(CONTEXT_KEYS))
    if unknown:
        raise TypeError(f"bind_context() got unknown ids {unknown}; allowed: {list(CONTEXT_KEYS)}")
    tokens = {key: _CONTEXT[key].set(None if value is None else str(value)) for key, value in ids.items()}
    return ContextBinding(tokens)


def current_context() -> dict[str, str]:
    """The ids bound in the current context (unset ones omitted)."""
    out: dict[str, str] = {}
    for key, var in _CONTEXT.items():
        value = var.get()
        if value is not None:
            out[key] = value
    return out


@contextmanager
def _silenced() -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # a full disk or a vanished log dir must not break a request
        _std_log.warning("bdi diagnostics log write failed: %s", exc)


def _writable_log_file(directory: Path) -> Path | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOG_FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError:
        return None
    return path


def configure_logging(log_dir: Path | None) -> Path | None:
    """Choose the JSONL file: ``log_dir`` first, then ``./logs``; None (disabled) when neither is writable."""
    global _sink_path
    candidates = [Path(log_dir)] if log_dir is not None else []
    candidates.append(Path("logs"))
    chosen: Path | None = None
    for directory in candidates:
        chosen = _writable_log_file(directory)
        if chosen is not None:
            chosen = chosen.absolute()
            break
    with _sink_lock:
        _sink_path = chosen
    return chosen


def disable_logging() -> None:
    """Stop writing the JSONL file (the stdlib mirror stays)."""
    global _sink_path
    with _sink_lock:
        _sink_path = None


def current_log_file() -> Path | None:
    """The JSONL file lines go to now, or None when file logging is disabled."""
    return _sink_path


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars/arrays unwrapped, non-finite floats and unknown objects str()'d."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        try:
            return _jsonable(tolist())
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def format_line(event: str, fields: Mapping[str, Any]) -> str:
    """One JSONL line (with the trailing newline) for ``event``: base keys, context ids, fields."""
    record: dict[str, Any] = {
        "ts": time.time(),
        "event": event,
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
    }
    for key, value in current_context().items():
        if key not in fields:
            record[key] = value
    for key, value in fields.items():
        if key not in _BASE_KEYS:
            record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def slog(event: str, **fields: Any) -> None:
    """Append one structured event to the diagnostics file and mirror it to the ``bdi`` logger."""
    try:
        line = format_line(event, fields)
    except (TypeError, ValueError) as exc:  # defensive: _jsonable should make this unreachable
        line = json.dumps({"ts": time.time(), "event": event, "log_error": str(exc)}) + "\n"
    if _std_log.isEnabledFor(logging.DEBUG):
        _std_log.debug("%s", line.rstrip("\n"))
    path = _sink_path
    if path is None:
        return
    data = line.encode("utf-8")
    with _silenced():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
