"""The one sha256 helper for files: weights, exported graphs, params files and samples are hashed alike."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

# Speed only: the sha256 of a file keyed by its fingerprint (path, mtime_ns, size). A changed file gets a
# new key, so a stale entry can never be returned for it.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}
_SHA256_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (memoised on path + mtime_ns + size)."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    with _SHA256_LOCK:
        cached = _SHA256_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with resolved.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _SHA256_LOCK:
        _SHA256_CACHE[key] = value
    return value
