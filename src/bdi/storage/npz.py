"""The ``.npz`` codec of a memory (docs/contract.md "Files"): emb (m, D) float32, token_h, token_w (int64) and
a JSON ``metadata`` string, read with pickle disabled. The store adds its own keys to the metadata
(:data:`STORE_KEYS`)."""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bdi.errors import InvalidInputError, StorageError
from bdi.patchcore.memory import Memory
from bdi.storage.fsio import json_default

STORE_KEYS = ("fingerprint", "index_sha256", "model_ref")  # metadata keys the store adds to the npz
# what numpy/zipfile raise on a damaged or foreign npz (never shown raw to callers)
NPZ_ERRORS = (
    zipfile.BadZipFile, zlib.error, KeyError, IndexError, ValueError, TypeError, OSError, EOFError,
)


def encode_memory_npz(memory: Memory, *, extra: Mapping[str, Any]) -> bytes:
    """The ``.npz`` bytes: emb (m, D) float32, token_h, token_w (int64), metadata (JSON string)."""
    metadata = {k: v for k, v in memory.metadata.items() if k not in STORE_KEYS}
    metadata.update(extra)
    try:
        meta_json = json.dumps(metadata, ensure_ascii=False, default=json_default)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"memory metadata is not JSON-serialisable: {exc}") from exc
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        emb=np.ascontiguousarray(memory.embeddings, dtype=np.float32),
        token_h=np.asarray(int(memory.token_shape[0]), dtype=np.int64),
        token_w=np.asarray(int(memory.token_shape[1]), dtype=np.int64),
        metadata=np.asarray(meta_json),
    )
    return buf.getvalue()


def decode_memory_npz(data: bytes, *, path: Path) -> tuple[Memory, dict[str, Any]]:
    """Parse npz bytes (pickle disabled) into a read-only :class:`Memory` and the store's own keys."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            emb = np.asarray(npz["emb"])
            token_h = int(np.asarray(npz["token_h"]).reshape(-1)[0])
            token_w = int(np.asarray(npz["token_w"]).reshape(-1)[0])
            raw_meta = np.asarray(npz["metadata"]).reshape(-1)[0] if "metadata" in npz.files else "{}"
        if isinstance(raw_meta, bytes):  # an npz written with a bytes (dtype S) metadata string
            raw_meta = raw_meta.decode("utf-8")
        metadata = json.loads(str(raw_meta)) if str(raw_meta).strip() else {}
    except NPZ_ERRORS as exc:
        raise StorageError(f"corrupt memory file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise StorageError(f"corrupt memory file {path}: metadata is not a JSON object")
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.dtype.kind != "f":
        raise StorageError(f"corrupt memory file {path}: emb has shape {emb.shape} and dtype {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    emb.flags.writeable = False  # shared through the cache
    store_keys = {k: metadata.pop(k) for k in STORE_KEYS if k in metadata}
    memory = Memory(embeddings=emb, token_shape=(token_h, token_w), metadata=metadata)
    expected = store_keys.get("fingerprint")
    if isinstance(expected, str) and expected != memory.fingerprint:
        raise StorageError(f"corrupt memory file {path}: content does not match its recorded fingerprint")
    return memory, store_keys


def read_model_key(npz_path: Path) -> str | None:
    """The raw model key recorded in an npz's metadata (``model_ref.model_key``), if any (only that member is read)."""
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            meta = json.loads(str(np.asarray(npz["metadata"]).reshape(-1)[0]))
    except NPZ_ERRORS:
        return None
    ref = meta.get("model_ref") if isinstance(meta, dict) else None
    key = ref.get("model_key") if isinstance(ref, dict) else None
    return key if isinstance(key, str) and key else None
