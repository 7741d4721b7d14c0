"""Parsing of request parts the framework cannot type for us: required JSON keys and uploads.

JSON bodies of /calibrate_ng, /infer_dataset and /calibrate_dataset are plain objects (a non-object
is a 422 from FastAPI), validated by the models of :mod:`serving.requests`; a missing ``role_id`` is
400 A ``'role_id'`` like the reference (contract C8), not a 422. Failures raise ``InvalidInputError``
so the one error table decides the status and shape. Upload limits are :class:`bdi.service.UploadLimits`'s
(one message per limit, shared with the library).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import UploadFile

from bdi.errors import InvalidInputError
from bdi.service import UploadLimits

JsonObject = Mapping[str, Any]


def required_str(body: JsonObject, key: str) -> str:
    """A required string key; missing gives the reference's ``KeyError`` text, e.g. ``'role_id'``."""
    if key not in body:
        raise InvalidInputError(repr(key))
    value = body[key]
    if not isinstance(value, str):
        raise InvalidInputError(f"{key} must be a string")
    return value


def read_upload(upload: UploadFile, *, limits: UploadLimits) -> tuple[str, bytes]:
    """``(client filename, bytes)`` of one uploaded part, never reading more than ``max_upload_bytes + 1``.

    Starlette already spooled the part to a temporary file; this keeps an oversized one out of RAM.
    """
    name = upload.filename or ""
    label = name or "upload"
    if upload.size is not None:
        limits.check_file_size(upload.size, name=label)
    data = upload.file.read(limits.max_upload_bytes + 1)
    limits.check_file_size(len(data), name=label, truncated=True)
    return name, data


def read_uploads(uploads: Sequence[UploadFile] | None, *, limits: UploadLimits) -> list[tuple[str, bytes]]:
    """:func:`read_upload` for each part, in order, after checking the file count: too many files
    are refused before any of them is read into memory."""
    parts = list(uploads or ())
    limits.check_file_count(len(parts))
    return [read_upload(u, limits=limits) for u in parts]
