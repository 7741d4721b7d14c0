"""ModelStore: refs → paths, artefact writes, fallback reads, and the per-recipe mm_per_px lock (kept by
:mod:`bdi.storage.recipes`); a memory's npz codec is :mod:`bdi.storage.npz`, the calibration files are
:mod:`bdi.storage.calibrations`' (``ModelStore.calibrations``).

Layout (docs/contract.md "Files"), under ``root``::

    recipes/<recipe>/recipe_meta.json                      the mm_per_px lock
    recipes/<recipe>/<model_key_fs>/<base>.npz            emb, token_h, token_w, metadata
    recipes/<recipe>/<model_key_fs>/<base>_index.faiss    faiss serialize_index bytes
    recipes/<recipe>/<model_key_fs>/<base>_calib.json     calibration, indent 2

Ids become folder and file names in :mod:`bdi.refs`; every write is atomic (:mod:`bdi.storage.fsio`); the
read-modify-write of ``recipe_meta.json`` runs under a file lock (docs/design.md "Atomic writes and file locks").

Memory/index consistency: the index is written first, then the npz, whose metadata records
``index_sha256`` (the hash of the index bytes it was saved with). A reader checks the hash; a torn
pair (one file from a newer save) is re-read, and if it persists (e.g. a crash between the two
writes) the index is rebuilt from the npz rows, which are the source of truth. Caches are keyed by
file identity (inode, mtime_ns, size) and only hold verified pairs, so a rewritten file is always
re-read.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bdi.errors import BDIError, FitInProgressError, InvalidInputError, StorageError
from bdi.logging import slog
from bdi.patchcore.imaging import validate_mm_per_px
from bdi.patchcore.knn import FAISS_AVAILABLE, KnnIndex
from bdi.patchcore.memory import Memory
from bdi.refs import (
    ModelRef,
    check_recipe_id,
    decode_id,
    ensure_inside,
    legacy_model_key_dir,
    legacy_name,
    recipe_dir_candidates,
)
from bdi.storage import recipes
from bdi.storage.cache import LRUCache, StoreCacheHook, named_hook
from bdi.storage.calibrations import CalibrationFiles
from bdi.storage.fsio import TORN_READ_RETRIES, FileIdentity, atomic_write_bytes, exclusive_lock, read_with_identity
from bdi.storage.npz import decode_memory_npz, encode_memory_npz, read_model_key

ArtifactKind = Literal["memory", "index", "calib"]

_SUFFIX: dict[str, str] = {"memory": ".npz", "index": "_index.faiss", "calib": "_calib.json"}
_LEGACY_DIR_NAME: dict[str, str] = {"memory": "memory.npz", "index": "index.faiss", "calib": "calib.json"}

# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ArtifactPaths:
    memory: Path
    index: Path
    calib: Path


@dataclass(frozen=True)
class Resolution:
    """The first existing path for an artefact (None on a miss), its identity when found (the stat
    that found it, so callers need not stat again) and every path probed, in order."""

    path: Path | None
    probed: tuple[Path, ...]
    identity: FileIdentity | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A memory with its index; ``index`` is None when faiss is installed and no index file exists."""

    memory: Memory
    index: KnnIndex | None
    memory_path: Path
    index_path: Path | None

    @property
    def fingerprint(self) -> str:
        """The memory's content hash (computed once per loaded memory; the load verified it)."""
        return self.memory.fingerprint


@dataclass(frozen=True)
class StoredModel:
    """One fitted model found on disk by :meth:`ModelStore.list_models`."""

    ref: ModelRef
    memory_path: Path
    index_path: Path | None
    calib_path: Path | None


# ----------------------------------------------------------------------------------------- store


class ModelStore:
    """Model artefacts and recipe meta under one root directory (``BDI_MODELS_DIR``)."""

    def __init__(
        self, root: Path, *, cache_max_entries: int = 32, faiss_gpu_device: int | None = None,
        on_cache_event: StoreCacheHook | None = None,
    ) -> None:
        """``faiss_gpu_device``: move loaded faiss indexes to that GPU when faiss-gpu sees it (the cached
        model then holds the GPU copy); None keeps them on the CPU. ``on_cache_event(cache, event)`` is told
        of each lookup and put of the ``memory``, ``model`` and ``calibration`` caches (a ``model`` put is a
        model read from disk)."""
        self.root = Path(root)
        self._gpu_device = faiss_gpu_device
        self._memories: LRUCache[FileIdentity, tuple[Memory, dict[str, Any]]] = LRUCache(
            cache_max_entries, on_event=named_hook(on_cache_event, "memory"))
        self._models: LRUCache[tuple[FileIdentity, FileIdentity | None], LoadedModel] = LRUCache(
            cache_max_entries, on_event=named_hook(on_cache_event, "model"))
        self.calibrations = CalibrationFiles(self, cache_max_entries=cache_max_entries,
                                             on_event=named_hook(on_cache_event, "calibration"))

    # -------------------------------------------------------------- layout
    @property
    def recipes_root(self) -> Path:
        return self.root / "recipes"

    def recipe_dir(self, recipe_id: str) -> Path:
        check_recipe_id(recipe_id)
        return ensure_inside(self.root, self.recipes_root / recipe_id)

    def paths(self, ref: ModelRef) -> ArtifactPaths:
        """Write targets: ``<root>/recipes/<recipe>/<model_key_fs>/<base>{.npz,_index.faiss,_calib.json}``."""
        directory = self.recipe_dir(ref.recipe_id) / ref.model_key_fs
        base = ref.base
        return ArtifactPaths(
            memory=ensure_inside(self.root, directory / f"{base}{_SUFFIX['memory']}"),
            index=ensure_inside(self.root, directory / f"{base}{_SUFFIX['index']}"),
            calib=ensure_inside(self.root, directory / f"{base}{_SUFFIX['calib']}"),
        )

    def candidates(self, ref: ModelRef, kind: ArtifactKind) -> list[Path]:
        """docs/contract.md "Model read order" for one artefact kind; in each recipe dir the key's folder, then (when it
        differs) the folder the legacy non-injective sanitiser gave it."""
        suffix = _SUFFIX[kind]
        base = ref.base
        out = [d / mk / f"{base}{suffix}" for d in recipe_dir_candidates(self.recipes_root, ref.recipe_id)
               for mk in self._key_dirs(ref)]
        role_s, roi_s = legacy_name(ref.role_id), legacy_name(ref.roi_id)
        out.append(self.root / f"{role_s}_{roi_s}{suffix}")
        out.append(self.root / role_s / roi_s / _LEGACY_DIR_NAME[kind])
        return [ensure_inside(self.root, p) for p in out]

    @staticmethod
    def _key_dirs(ref: ModelRef) -> tuple[str, ...]:
        current, legacy = ref.model_key_fs, legacy_model_key_dir(ref.model_key, roi_id=ref.roi_id)
        return (current,) if legacy == current else (current, legacy)

    def _legacy_dir_belongs_to(self, path: Path, ref: ModelRef) -> bool:
        """A legacy-named key folder may hold another key's model (``a b`` and ``a_b`` shared one):
        use it only when its memory records this key, or records none (written by the legacy backend)."""
        if path.parent.name == ref.model_key_fs or path.parent.parent.parent != self.recipes_root:
            return True
        recorded = read_model_key(path.parent / f"{ref.base}{_SUFFIX['memory']}")
        return recorded is None or recorded.strip() == ref.model_key.strip()

    def resolve(self, ref: ModelRef, kind: ArtifactKind) -> Resolution:
        """The first existing file among :meth:`candidates`; logs ``storage.resolve_<kind>.not_found``."""
        probed: list[Path] = []
        for path in self.candidates(ref, kind):
            probed.append(path)
            ident = FileIdentity.of(path)
            if ident is not None and self._legacy_dir_belongs_to(path, ref):
                return Resolution(path=path, probed=tuple(probed), identity=ident)
        slog(f"storage.resolve_{kind}.not_found", probed_paths=[str(p) for p in probed],
             role_id=ref.role_id, roi_id=ref.roi_id, recipe_id=ref.recipe_id, model_key=ref.model_key)
        return Resolution(path=None, probed=tuple(probed))

    # -------------------------------------------------------------- model
    @contextmanager
    def fit_lock(self, ref: ModelRef, *, timeout_s: float) -> Iterator[None]:
        """One writer per model, across threads and processes: an exclusive ``flock`` on
        ``<model dir>/.<base>.fit.lock`` held for the whole fit. A second fit waits up to
        ``timeout_s``, then gets :class:`FitInProgressError`. The kernel drops the lock when its
        holder dies (even by SIGKILL), so a crashed fit never blocks the next one.
        """
        directory = self.paths(ref).memory.parent
        with exclusive_lock(
            directory / f".{ref.base}.fit.lock", timeout_s=timeout_s,
            busy=lambda: FitInProgressError(
                f"another fit of model_key '{ref.model_key}' (role '{ref.role_id}', roi '{ref.roi_id}') is in "
                f"progress; waited {timeout_s:g} s (BDI_FIT_LOCK_TIMEOUT_S), retry when it has finished"),
            unusable=lambda exc: StorageError(f"cannot take the fit lock in {directory}: {exc}"),
        ):
            yield

    def save_model(self, ref: ModelRef, memory: Memory, index: KnnIndex | None) -> ArtifactPaths:
        """Write the index (if a faiss one is given), then the npz recording the index's sha256.

        With no faiss index an old index file is removed first, so it can never pair with the new npz.
        """
        paths = self.paths(ref)
        index_sha: str | None = None
        if index is not None and index.backend != "torch":
            index_bytes = index.serialize()
            index_sha = hashlib.sha256(index_bytes).hexdigest()
            atomic_write_bytes(paths.index, index_bytes)
        else:
            try:
                paths.index.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot remove the stale index {paths.index}: {exc}") from exc
        extra = {
            "fingerprint": memory.fingerprint,
            "index_sha256": index_sha,
            "model_ref": ref.to_dict(),
        }
        atomic_write_bytes(paths.memory, encode_memory_npz(memory, extra=extra))
        return paths

    def _memory_from(
        self, path: Path, ident: FileIdentity | None
    ) -> tuple[Memory, dict[str, Any], FileIdentity] | None:
        """The memory at ``path``: from the cache when ``ident`` (its identity as resolved) is cached,
        else read and decoded; None when the file vanished."""
        if ident is not None:
            cached = self._memories.get(ident)
            if cached is not None:
                return cached[0], cached[1], ident
        read = read_with_identity(path)
        if read is None:
            return None
        data, ident = read
        memory, store_keys = decode_memory_npz(data, path=path)
        self._memories.put(ident, (memory, store_keys))
        return memory, store_keys, ident

    def load_memory(self, ref: ModelRef) -> Memory | None:
        """The memory resolved with fallbacks, or None; a corrupt file raises :class:`StorageError`."""
        for _ in range(TORN_READ_RETRIES):
            res = self.resolve(ref, "memory")
            if res.path is None:
                return None
            loaded = self._memory_from(res.path, res.identity)
            if loaded is not None:
                return loaded[0]
        return None  # the file kept vanishing between resolve and read: treat as absent

    def load_model(self, ref: ModelRef) -> LoadedModel | None:
        """Memory + index (see the module doc for the consistency check), or None without a memory.

        Without faiss the index is a torch index built from the rows; with faiss and no index file
        (or an npz saved without one) it is None and the caller decides what that means.
        """
        torn: tuple[Path, Path, Memory, FileIdentity, FileIdentity | None] | None = None
        for attempt in range(TORN_READ_RETRIES):
            mem_res = self.resolve(ref, "memory")
            if mem_res.path is None:
                return None
            idx_res = self.resolve(ref, "index") if FAISS_AVAILABLE else None
            idx_path = idx_res.path if idx_res is not None else None
            idx_ident = idx_res.identity if idx_res is not None else None
            if mem_res.identity is not None:
                cached = self._models.get((mem_res.identity, idx_ident))
                if cached is not None:
                    return cached
            loaded = self._memory_from(mem_res.path, mem_res.identity)
            if loaded is None:
                continue  # replaced or removed between resolve and read
            memory, store_keys, mem_ident = loaded
            model, idx_ident = self._attach_index_file(memory, store_keys, mem_path=mem_res.path, idx_path=idx_path)
            if model is not None:
                self._models.put((mem_ident, idx_ident), model)
                return model
            if idx_path is not None:
                torn = (mem_res.path, idx_path, memory, mem_ident, idx_ident)
            time.sleep(0.005 * (2**attempt))  # a concurrent save is between its two writes
        if torn is None:
            return None
        return self._rebuild_index(*torn)

    def _rebuild_index(
        self,
        mem_path: Path,
        idx_path: Path,
        memory: Memory,
        mem_ident: FileIdentity,
        idx_ident: FileIdentity | None,
    ) -> LoadedModel:
        """A persistent memory/index mismatch: index the npz rows again (they are the truth)."""
        slog("storage.index_mismatch", memory_path=str(mem_path), index_path=str(idx_path),
             action="rebuilt_from_memory")
        factory = str(dict(memory.metadata.get("memory") or {}).get("knn_index", "Flat"))
        try:
            index = KnnIndex.build(memory.embeddings, factory=factory)
        except InvalidInputError:
            index = KnnIndex.build(memory.embeddings, factory="Flat")
        model = LoadedModel(memory=memory, index=self._to_configured_gpu(index), memory_path=mem_path, index_path=None)
        self._models.put((mem_ident, idx_ident), model)
        return model

    def _attach_index_file(
        self, memory: Memory, store_keys: Mapping[str, Any], *, mem_path: Path, idx_path: Path | None
    ) -> tuple[LoadedModel | None, FileIdentity | None]:
        """Join a memory with its index file; (None, _) when the index belongs to another save."""
        saved_without_index = "index_sha256" in store_keys and store_keys["index_sha256"] is None
        if not FAISS_AVAILABLE:
            index = KnnIndex.build(memory.embeddings, use_faiss=False)
            return LoadedModel(memory=memory, index=index, memory_path=mem_path, index_path=None), None
        read = read_with_identity(idx_path) if idx_path is not None and not saved_without_index else None
        if read is None:
            return LoadedModel(memory=memory, index=None, memory_path=mem_path, index_path=None), None
        data, idx_ident = read
        expected = store_keys.get("index_sha256")
        if isinstance(expected, str) and hashlib.sha256(data).hexdigest() != expected:
            return None, idx_ident
        try:
            index = KnnIndex.deserialize(data)
        except StorageError as exc:
            raise StorageError(f"corrupt index file {idx_path}: {exc}") from exc
        if index.size != memory.size or index.dim != memory.dim:  # legacy pairs carry no hash
            return None, idx_ident
        return LoadedModel(memory=memory, index=self._to_configured_gpu(index), memory_path=mem_path,
                           index_path=idx_path), idx_ident

    def _to_configured_gpu(self, index: KnnIndex) -> KnnIndex:
        """The index on the configured GPU when possible, else unchanged
        (docs/contract.md "Nearest-neighbour index")."""
        return index if self._gpu_device is None else index.to_gpu(self._gpu_device)

    # -------------------------------------------------------------- recipe lock
    def lock_mm_per_px(self, recipe_id: str, mm_per_px: float) -> None:
        """First value wins per recipe; later ones must match within 1e-6·max(1,|a|,|b|)
        (docs/contract.md "Scale lock", :mod:`bdi.storage.recipes`)."""
        value = validate_mm_per_px(mm_per_px)
        recipes.lock_mm_per_px(self.recipe_dir(recipe_id), recipe_id=recipe_id, mm_per_px=value)

    def check_mm_per_px(self, recipe_id: str, mm_per_px: float) -> None:
        """:class:`ScaleMismatchError` when the recipe holds another scale; writes nothing (checked before the work,
        locked after it succeeded: docs/design.md "Failed requests leave nothing behind")."""
        recipes.check_mm_per_px(self.recipe_dir(recipe_id), recipe_id=recipe_id, mm_per_px=mm_per_px)

    def unlock_mm_per_px(self, recipe_id: str) -> float | None:
        """Reset the recipe's scale lock (``bdi recipe unlock-scale``); the value it held, None when none."""
        return recipes.unlock_mm_per_px(self.recipe_dir(recipe_id), recipe_id=recipe_id)

    # -------------------------------------------------------------- listing
    def model_keys(self, recipe_id: str) -> list[str]:
        """Filesystem model keys of ``recipe_id`` that hold at least one memory file, sorted."""
        directory = self.recipe_dir(recipe_id)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return []
        return [e.name for e in entries if e.is_dir() and any(Path(e.path).glob("*__*.npz"))]

    def list_models(self) -> list[StoredModel]:
        """Every ``recipes/<recipe>/<mk>/<b64role>__<b64roi>.npz`` with decodable names, sorted."""
        out: list[StoredModel] = []
        for npz in sorted(self.recipes_root.glob("*/*/*__*.npz")):
            recipe_dir, mk_dir = npz.parent.parent.name, npz.parent.name
            role_b64, _, roi_b64 = npz.stem.partition("__")
            role_id, roi_id = decode_id(role_b64), decode_id(roi_b64)
            if role_id is None or roi_id is None:
                continue
            model_key = read_model_key(npz) or mk_dir
            try:
                ref = ModelRef(recipe_id=recipe_dir, role_id=role_id, roi_id=roi_id, model_key=model_key)
                if mk_dir not in self._key_dirs(ref) or ref.base != npz.stem:
                    continue
            except BDIError:
                continue
            index, calib = (npz.parent / f"{npz.stem}{_SUFFIX[k]}" for k in ("index", "calib"))
            out.append(StoredModel(
                ref=ref,
                memory_path=npz,
                index_path=index if index.is_file() else None,
                calib_path=calib if calib.is_file() else None,
            ))
        return out
