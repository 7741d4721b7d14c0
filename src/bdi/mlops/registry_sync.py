"""Registry → models dir: write the registered versions holding the alias where the server reads them.

:func:`sync_registry` (and :func:`sync_registered`) writes the versions holding the alias into
``BDI_MODELS_DIR`` at the exact ModelStore paths: memory, index, calibration and a lineage sidecar
(:mod:`bdi.storage.lineage`) replaced together under the model's exclusive lock (:mod:`bdi.storage.model_lock`), so
a running server (whose caches are keyed by file identity) serves them at its next request.
:mod:`bdi.mlops.follower` runs it in a loop.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from bdi.errors import BDIError, InvalidInputError, StorageError
from bdi.logging import slog
from bdi.mlops.pyfunc import single_model
from bdi.mlops.registration import download_version, finite_float, mlflow_errors
from bdi.mlops.tracking import TrackingTarget, global_tracking_uri
from bdi.refs import ModelRef
from bdi.storage import model_lock
from bdi.storage.fsio import FileIdentity, atomic_write_bytes
from bdi.storage.lineage import LINEAGE_SUFFIX, SOURCE_REGISTRY, Lineage, read_lineage, write_lineage
from bdi.storage.store import ArtifactPaths, ModelStore

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient

SYNC_LOCK_FILE = ".registry_sync.lock"
SYNC_LOCK_TIMEOUT_S = 120.0
SYNC_TEMP_PREFIX = ".sync-"  # download folders inside the models dir (same filesystem as the targets)


@dataclass(frozen=True)
class SyncedModel:
    """A registered version written into the models dir by :func:`sync_registered`."""

    name: str
    version: int
    alias: str
    ref: ModelRef
    paths: ArtifactPaths
    fingerprint: str
    written: tuple[str, ...]  # artefact kinds replaced, in write order: index, memory, calib


def _registered_models(client: MlflowClient, prefix: str) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = client.search_registered_models(filter_string=f"name LIKE '{prefix}.%'", max_results=100,
                                               page_token=token)
        for model in page:
            if model.name.startswith(f"{prefix}."):
                yield model
        token = page.token
        if not token:
            return


def _read_or_none(path: Path) -> bytes | None:
    """The bytes of ``path``, None when it does not exist; other read failures are StorageError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc


def materialise_model(*, source: ModelStore, ref: ModelRef, target: ModelStore) -> tuple[str, ...]:
    """Make ``target``'s files of ``ref`` byte-identical to ``source``'s; returns the kinds replaced.

    Writes go index → npz → calibration, each atomically (``os.replace``): the npz records its
    index's sha256, so a reader never pairs a new index with an old npz, and a calibration records
    its memory's fingerprint, so an old one is reported stale rather than applied to a new memory.
    A file the source lacks is removed from the target. Identical files are left untouched.
    """
    src, dst = source.paths(ref), target.paths(ref)
    if FileIdentity.of(src.memory) is None:
        raise StorageError(f"{src.memory} is missing: the registered model has no memory")
    plan = [("index", src.index, dst.index), ("memory", src.memory, dst.memory), ("calib", src.calib, dst.calib)]
    changed: list[str] = []
    for kind, s, d in plan:  # each source file is read once, compared and written from those bytes
        data = _read_or_none(s)
        if data == _read_or_none(d):
            continue
        changed.append(kind)
        if data is not None:
            atomic_write_bytes(d, data)
        else:
            try:
                d.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot remove {d}: {exc}") from exc
    return tuple(changed)

def sync_registered(
    *,
    tracking: TrackingTarget,
    models_dir: Path,
    alias: str | None = None,
    exports_root: Path | None = None,
) -> list[SyncedModel]:
    """Write every ``<prefix>.*`` registered version holding ``alias`` (default ``tracking.alias``) into
    ``models_dir`` at the exact ModelStore paths (:func:`sync_registry`); returns the versions whose
    files changed. Running it twice writes nothing the second time.
    """
    return sync_registry(tracking=tracking, models_dir=models_dir, alias=alias,
                         exports_root=exports_root).changed


@dataclass(frozen=True)
class SyncFailure:
    """An alias holder that could not be synced (its previous files, if any, stay served)."""

    name: str
    version: int
    error: str

    def __str__(self) -> str:
        return f"{self.name} v{self.version}: {self.error}"


@dataclass(frozen=True)
class SyncReport:
    """One sync: every alias holder now in the models dir (``held``, ``written`` empty when it already
    was) and the sidecars released because their registered model lost the alias."""

    alias: str
    held: tuple[SyncedModel, ...]
    released: tuple[str, ...] = ()
    failed: tuple[SyncFailure, ...] = ()  # alias holders that could not be synced this time

    @property
    def changed(self) -> list[SyncedModel]:
        return [m for m in self.held if m.written]


def sync_registry(
    *,
    tracking: TrackingTarget,
    models_dir: Path,
    alias: str | None = None,
    exports_root: Path | None = None,
) -> SyncReport:
    """Make ``models_dir`` hold every ``<prefix>.*`` registered version that holds ``alias``.

    Per version: when the model's lineage sidecar already names that version (and its memory is there)
    nothing is downloaded; otherwise the version is downloaded into a temp folder inside ``models_dir``
    (same filesystem) and its memory, index, calibration and a new lineage sidecar replace the model's
    files together, under the model's exclusive lock (:mod:`bdi.storage.model_lock`), so a reader sees all old
    files or all new ones. The registry wins over an API-fitted model of the same key (logged as
    ``registry.replaced_local``). A sidecar whose registered model no longer holds the alias is
    released (``managed: false``): the files stay and the API may write the model again.
    Syncs of one models dir are serialised by a file lock. A version that carries the export of its
    feature net (``exports/<key>``, see ``bdi.runtime.export``) has it copied into ``exports_root`` (the servers'
    export cache) when given; a version without one syncs all the same.

    Raises:
        StorageError: MLflow unreachable or failing, or the models dir not writable.
    """
    if not tracking.enabled:
        raise InvalidInputError("MLflow tracking is disabled (TrackingConfig.enabled=false): cannot sync")
    with mlflow_errors("sync"), global_tracking_uri(tracking.tracking_uri):
        return _sync(tracking=tracking, models_dir=models_dir, alias=alias or tracking.alias,
                     exports_root=exports_root)


def _sync_exports(model_dir: Path, exports_root: Path) -> list[str]:
    """Copy the exports a downloaded version carries into ``exports_root``; returns the keys copied."""
    from bdi.config import EXPORTS_DIRNAME
    from bdi.errors import ExportError
    from bdi.runtime.export import copy_export

    carried = model_dir / EXPORTS_DIRNAME
    if not carried.is_dir():
        return []
    copied: list[str] = []
    for folder in sorted(p for p in carried.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if copy_export(src_root=carried, dst_root=exports_root, key=folder.name):
                copied.append(folder.name)
        except ExportError as exc:  # the model still serves: the server re-exports or runs torch
            slog("registry.export_skipped", export_key=folder.name, error=str(exc))
    return copied


def _sync(*, tracking: TrackingTarget, models_dir: Path, alias: str,
          exports_root: Path | None = None) -> SyncReport:
    from mlflow.exceptions import MlflowException

    client, uri = tracking.client(), tracking.tracking_uri
    models_dir = Path(models_dir)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the models dir {models_dir}: {exc}") from exc
    target = ModelStore(models_dir)
    held: list[SyncedModel] = []
    try:
        with FileLock(str(models_dir / SYNC_LOCK_FILE), timeout=SYNC_LOCK_TIMEOUT_S):
            for leftover in models_dir.glob(f"{SYNC_TEMP_PREFIX}*"):  # from a sync that crashed
                shutil.rmtree(leftover, ignore_errors=True)
            holders = {}
            for registered in _registered_models(client, tracking.registered_model_prefix):
                version = (registered.aliases or {}).get(alias)
                if version is not None:
                    holders[registered.name] = int(version)
            failed: list[SyncFailure] = []
            for name, version in sorted(holders.items()):
                try:  # one broken version must not keep the other models from following the registry
                    held.append(_sync_version(client, uri=uri, target=target, name=name, version=version,
                                              alias=alias, exports_root=exports_root))
                except (BDIError, MlflowException, OSError) as exc:
                    message = str(getattr(exc, "message", exc))
                    failed.append(SyncFailure(name=name, version=version, error=message))
                    slog("registry.sync_version_failed", name=name, version=version, alias=alias, error=message)
            released = _release_unheld(target, prefix=tracking.registered_model_prefix, alias=alias, held=set(holders))
    except Timeout as exc:
        raise StorageError(f"timed out waiting for another sync of {models_dir}") from exc
    return SyncReport(alias=alias, held=tuple(held), released=released, failed=tuple(failed))


def _version_ref(tags: Mapping[str, str]) -> ModelRef | None:
    """The model a version holds, from its identity tags (None for versions registered without them)."""
    try:
        return ModelRef(recipe_id=tags["recipe_id"], role_id=tags["role_id"], roi_id=tags["roi_id"],
                        model_key=tags["model_key"])
    except (KeyError, BDIError):
        return None


def _up_to_date(target: ModelStore, ref: ModelRef, *, name: str, version: int, alias: str,
                fingerprint: str | None) -> bool:
    lineage = read_lineage(target, ref)
    named = (lineage.registered_model, lineage.registered_version, lineage.registered_alias) if lineage else None
    return (lineage is not None and lineage.source == SOURCE_REGISTRY and lineage.managed
            and named == (name, version, alias)
            and fingerprint is not None and lineage.memory_fingerprint == fingerprint
            and target.paths(ref).memory.is_file())

def _sync_version(client: MlflowClient, *, uri: str, target: ModelStore, name: str, version: int,
                  alias: str, exports_root: Path | None = None) -> SyncedModel:
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    ref = _version_ref(tags)
    fingerprint = tags.get("memory_fingerprint")
    if ref is not None and _up_to_date(target, ref, name=name, version=version, alias=alias, fingerprint=fingerprint):
        slog("registry.sync_up_to_date", name=name, version=version, alias=alias, model_key=ref.model_key)
        return SyncedModel(name=name, version=version, alias=alias, ref=ref, paths=target.paths(ref),
                           fingerprint=str(fingerprint), written=())
    with tempfile.TemporaryDirectory(dir=target.root, prefix=SYNC_TEMP_PREFIX) as tmp:
        model_dir = download_version(name=name, version=version, uri=uri, dest=Path(tmp))
        ref = single_model(model_dir).ref
        source = ModelStore(model_dir)
        memory = source.load_memory(ref)
        if memory is None:
            raise StorageError(f"{name} version {version} has no memory file")
        calib = source.calibrations.document(ref) or {}  # the file copied as it is (materialise_model)
        lineage = Lineage(
            source=SOURCE_REGISTRY, memory_fingerprint=memory.fingerprint, managed=True, registered_model=name,
            registered_version=version, registered_alias=alias, mlflow_run_id=mv.run_id or None,
            git_commit=tags.get("git_commit") or tags.get("dvc_commit") or None,
            data_hash=tags.get("data_hash") or None, data_source=tags.get("data_source") or None,
            calibration_run_id=tags.get("calibration_run_id") or None,
            calibration_threshold=finite_float(calib.get("threshold")),
            calibration_created_at_utc=calib.get("created_at_utc") if isinstance(calib.get("created_at_utc"), str)
            else None,
        )
        before = read_lineage(target, ref)
        with model_lock.writing(target, ref):
            replaced_local = (before is None or before.source != SOURCE_REGISTRY) and target.paths(ref).memory.is_file()
            written = materialise_model(source=source, ref=ref, target=target)
            write_lineage(target, ref, lineage)
        exports = _sync_exports(model_dir, exports_root) if exports_root is not None else []
    if replaced_local:
        slog("registry.replaced_local", name=name, version=version, alias=alias, model_key=ref.model_key,
             previous_source=before.source if before is not None else None,
             previous_fingerprint=before.memory_fingerprint if before is not None else None)
    slog("registry.synced", name=name, version=version, alias=alias, written=list(written), exports=exports,
         model_key=ref.model_key, recipe_id=ref.recipe_id, role_id=ref.role_id, roi_id=ref.roi_id)
    return SyncedModel(name=name, version=version, alias=alias, ref=ref, paths=target.paths(ref),
                       fingerprint=memory.fingerprint, written=written or ("lineage",))


def _release_unheld(target: ModelStore, *, prefix: str, alias: str, held: set[str]) -> tuple[str, ...]:
    """Release the sidecars of models whose registered model no longer holds ``alias``."""
    released: list[str] = []
    for path in sorted(target.recipes_root.glob(f"*/*/*{LINEAGE_SUFFIX}")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        lineage = Lineage.from_dict(data) if isinstance(data, dict) else None
        if (lineage is None or lineage.source != SOURCE_REGISTRY or not lineage.managed
                or lineage.registered_alias != alias or not str(lineage.registered_model).startswith(f"{prefix}.")
                or lineage.registered_model in held):
            continue
        atomic_write_bytes(path, json.dumps(lineage.released().to_dict(), indent=2).encode("utf-8"))
        released.append(str(lineage.registered_model))
        slog("registry.released", name=lineage.registered_model, version=lineage.registered_version, alias=alias,
             path=str(path))
    return tuple(released)
