"""Parsing of request parts the framework cannot type for us: JSON-object bodies and uploads.

JSON bodies of /calibrate_ng, /infer_dataset and /calibrate_dataset are plain objects (a non-object
is a 422 from FastAPI); their keys are checked here so a missing ``role_id`` is 400 A ``'role_id'``
like the reference (contract C8), not a 422. Failures raise ``InvalidInputError`` so the one error
table decides the status and shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import UploadFile

from bdi.errors import InvalidInputError, UploadLimitError

JsonObject = Mapping[str, Any]
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def required_str(body: JsonObject, key: str) -> str:
    """A required string key; missing gives the reference's ``KeyError`` text, e.g. ``'role_id'``."""
    if key not in body:
        raise InvalidInputError(repr(key))
    value = body[key]
    if not isinstance(value, str):
        raise InvalidInputError(f"{key} must be a string")
    return value


def optional_str(body: JsonObject, key: str) -> str | None:
    """A string key, or None when absent or not a string (the reference ignores other types)."""
    value = body.get(key)
    return value if isinstance(value, str) else None


def optional_number(body: JsonObject, key: str) -> float | None:
    """A finite number (or numeric string) key, None when absent/null; anything else is bad input.

    Non-finite values are refused here: they could not be written back as strict JSON.
    """
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInputError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{key} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise InvalidInputError(f"{key} must be a finite number, got {value!r}")
    return number


def optional_bool(body: JsonObject, key: str, *, default: bool) -> bool:
    """A boolean key parsed like pydantic (true/false/1/0/yes/no/on/off/t/f/y/n); null → default."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise InvalidInputError(f"{key} must be a boolean, got {value!r}")


def optional_list(body: JsonObject, key: str) -> list[Any] | None:
    """A JSON array key, None when absent/null (its items are checked by the library)."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInputError(f"{key} must be a list of numbers")
    return value


def optional_str_list(body: JsonObject, key: str, *, default: Sequence[str]) -> list[str]:
    """A list of strings (null → default)."""
    value = body.get(key)
    if value is None:
        return list(default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{key} must be a list of strings")
    return list(value)


def read_upload(upload: UploadFile, *, max_bytes: int) -> tuple[str, bytes]:
    """``(client filename, bytes)`` of one uploaded part, never reading more than ``max_bytes + 1``.

    Starlette already spooled the part to a temporary file; this keeps an oversized one out of RAM.
    """
    name = upload.filename or ""
    label = name or "upload"
    if upload.size is not None and upload.size > max_bytes:
        raise UploadLimitError(
            f"{label}: {upload.size} bytes exceeds the limit of {max_bytes} bytes (BDI_MAX_UPLOAD_BYTES)"
        )
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UploadLimitError(
            f"{label}: more than {max_bytes} bytes exceeds the limit of {max_bytes} bytes "
            "(BDI_MAX_UPLOAD_BYTES)"
        )
    return name, data


def read_uploads(uploads: Sequence[UploadFile] | None, *, max_bytes: int) -> list[tuple[str, bytes]]:
    """:func:`read_upload` for each part, in order."""
    return [read_upload(u, max_bytes=max_bytes) for u in uploads or ()]
