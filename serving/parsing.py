"""Parsing of request parts the framework cannot type for us: required JSON keys and uploads.

JSON bodies of /calibrate_ng, /infer_dataset and /calibrate_dataset are plain objects (a non-object
is a 422 from FastAPI), validated by the models of :mod:`serving.schemas`; a missing ``role_id`` is
400 A ``'role_id'`` like the reference (contract C8), not a 422. Failures raise ``InvalidInputError``
so the one error table decides the status and shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import UploadFile

from bdi.errors import InvalidInputError, UploadLimitError

JsonObject = Mapping[str, Any]


def required_str(body: JsonObject, key: str) -> str:
    """A required string key; missing gives the reference's ``KeyError`` text, e.g. ``'role_id'``."""
    if key not in body:
        raise InvalidInputError(repr(key))
    value = body[key]
    if not isinstance(value, str):
        raise InvalidInputError(f"{key} must be a string")
    return value


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


def read_uploads(
    uploads: Sequence[UploadFile] | None, *, max_bytes: int, max_files: int
) -> list[tuple[str, bytes]]:
    """:func:`read_upload` for each part, in order, after checking the file count: too many files
    are refused before any of them is read into memory."""
    parts = list(uploads or ())
    if len(parts) > max_files:
        raise UploadLimitError(
            f"{len(parts)} files exceed the limit of {max_files} per request (BDI_MAX_FILES_PER_REQUEST)"
        )
    return [read_upload(u, max_bytes=max_bytes) for u in parts]
