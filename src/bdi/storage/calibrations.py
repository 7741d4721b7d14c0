"""The calibration JSON of each model in a :class:`bdi.storage.store.ModelStore`: read with the store's fallbacks
(cached by file identity, like the store's memories), written atomically to its current layout
(``<base>_calib.json``, indent 2), and copied as stored to another store.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdi.config import ScoringConfig
from bdi.errors import StorageError
from bdi.logging import slog
from bdi.patchcore.calibration import Calibration
from bdi.refs import ModelRef
from bdi.storage.cache import CacheEventHook, LRUCache
from bdi.storage.fsio import TORN_READ_RETRIES, FileIdentity, atomic_write_json, read_with_identity

if TYPE_CHECKING:
    from bdi.storage.store import ModelStore


class CalibrationFiles:
    """The calibrations of one store (``ModelStore.calibrations``): its paths and read order are the store's."""

    def __init__(self, store: ModelStore, *, cache_max_entries: int, on_event: CacheEventHook | None = None) -> None:
        self._store = store
        self._cache: LRUCache[FileIdentity, dict[str, Any]] = LRUCache(cache_max_entries, on_event=on_event)

    def save(self, ref: ModelRef, calib: Calibration) -> Path:
        """Atomically write the calibration JSON (:meth:`Calibration.to_dict`, indent 2) to the current layout."""
        return self._write_document(ref, calib.to_dict())

    def load(self, ref: ModelRef, *, defaults: ScoringConfig) -> Calibration | None:
        """The calibration resolved with fallbacks, or None (absent, corrupt or not a JSON object).

        ``defaults`` is the resolved scoring config: an old file without a percentile or area reads with its
        (:meth:`Calibration.from_dict`). Whether it applies to a memory is :func:`usable_calibration`'s call.

        Raises:
            CalibrationMissingError: the stored object is empty or has no numeric threshold.
        """
        document = self.document(ref)
        return None if document is None else Calibration.from_dict(document, defaults=defaults)

    def document(self, ref: ModelRef) -> dict[str, Any] | None:
        """The calibration JSON object exactly as stored (a copy; old files' missing keys stay missing), or None:
        what ``/manifest`` returns and the registry copy carries.

        A corrupt or non-object file also gives None (logged as ``storage.calib_corrupt``): the
        service then reports ``calibration_missing`` and a new calibration overwrites it.
        """
        for _ in range(TORN_READ_RETRIES):
            res = self._store.resolve(ref, "calib")
            if res.path is None:
                return None
            cached = self._cache.get(res.identity) if res.identity is not None else None
            if cached is not None:
                return copy.deepcopy(cached)
            read = read_with_identity(res.path)
            if read is None:
                continue
            data, ident = read
            try:
                value = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                slog("storage.calib_corrupt", path=str(res.path), error=str(exc))
                return None
            if not isinstance(value, dict):
                slog("storage.calib_corrupt", path=str(res.path), error="not a JSON object")
                return None
            self._cache.put(ident, value)
            return copy.deepcopy(value)
        return None

    def copy(self, ref: ModelRef, *, target: CalibrationFiles) -> Path | None:
        """Write this store's calibration of ``ref``, as stored, to ``target``'s current layout (indent 2);
        without one here, remove ``target``'s. Returns the path written, or None."""
        document = self.document(ref)
        if document is None:
            path = target._store.paths(ref).calib
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot remove the calibration {path}: {exc}") from exc
            return None
        return target._write_document(ref, document)

    def _write_document(self, ref: ModelRef, document: Mapping[str, Any]) -> Path:
        path = self._store.paths(ref).calib
        atomic_write_json(path, dict(document), indent=2)
        return path
