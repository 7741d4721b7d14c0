"""MLflow model registry: register a fitted ModelStore model, guard the alias, sync it back.

* :func:`register_model` logs the model as a pyfunc whose one artefact is a ModelStore root holding
  exactly that model (memory, index, calibration; see :func:`export_model_dir`), registers it as a new
  version of ``<prefix>.<recipe>.<role>.<roi>.<hash>``, tags it (ids, weights identity, metrics, DVC
  params hash …) and moves the alias (``champion``) only when the primary metric is at least as good
  as the current holder's. No stages.
* :func:`sync_registry` (and :func:`sync_registered`) writes the versions holding the alias into
  ``BDI_MODELS_DIR`` at the exact ModelStore paths: memory, index, calibration and a lineage sidecar
  (:mod:`bdi.lineage`) replaced together under the model's exclusive lock (:mod:`bdi.model_lock`), so
  a running server (whose caches are keyed by file identity) serves them at its next request.
  :mod:`bdi.sync` runs it in a loop.
* ``BdiPyfuncModel`` (built on first access, so ``mlflow`` is imported lazily) loads that folder with
  the same ``ModelStore`` the server uses and delegates scoring to :class:`bdi.service.InspectionService`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from . import model_lock
from .errors import BDIError, InvalidInputError, NotFittedError, StorageError, WeightsError
from .fsio import FileIdentity, atomic_write_bytes
from .lineage import LINEAGE_SUFFIX, SOURCE_REGISTRY, Lineage, read_lineage, write_lineage
from .logging import slog
from .refs import ModelRef
from .store import ArtifactPaths, ModelStore, StoredModel
from .tracking import (
    TrackingConfig,
    fluent_scope,
    global_tracking_uri,
    resolve_tracking_uri,
    tracking_client,
    weights_identity,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from .config import FeatureConfig

MODEL_ARTIFACT_NAME = "model"  # the logged model's name inside the run
MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artefact key holding the ModelStore root
METRIC_TAG_PREFIX = "metric."
SYNC_LOCK_FILE = ".registry_sync.lock"
# Load-time overrides a pyfunc accepts (``mlflow.pyfunc.load_model(uri, model_config={...})``); MLflow only
# lets through keys logged with the model, so they are logged with "" (= recorded value / default).
PYFUNC_CONFIG_KEYS = ("weights", "weights_cache_dir", "device", "precision", "batch_size")
SYNC_LOCK_TIMEOUT_S = 120.0
SYNC_TEMP_PREFIX = ".sync-"  # download folders inside the models dir (same filesystem as the targets)
_SLUG_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_SLUG_MAX = 40


# ----------------------------------------------------------------------------------------- names


def _slug(value: str) -> str:
    return _SLUG_BAD.sub("-", value).strip("-")[:_SLUG_MAX] or "default"


def registered_model_name(prefix: str, *, recipe_id: str, role_id: str, roi_id: str) -> str:
    """``<prefix>.<recipe>.<role slug>.<roi slug>.<12 hex>``: readable, MLflow-safe, deterministic.

    The slugs keep ``[A-Za-z0-9_-]`` (the rest becomes ``-``, 40 chars max); the hash of the exact
    ``(recipe, role, roi)`` triple keeps distinct triples apart when their slugs collide.
    """
    digest = hashlib.sha256(json.dumps([recipe_id, role_id, roi_id]).encode("utf-8")).hexdigest()[:12]
    return f"{prefix}.{_slug(recipe_id)}.{_slug(role_id)}.{_slug(roi_id)}.{digest}"


# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RegistrationResult:
    """A registered version and what happened to the alias (``previous_version`` = holder before)."""

    name: str
    version: int
    alias: str
    alias_moved: bool
    previous_version: int | None


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


# ----------------------------------------------------------------------------------------- model dirs


def _single_model(model_dir: Path) -> StoredModel:
    stored = ModelStore(model_dir).list_models()
    if len(stored) != 1:
        raise InvalidInputError(
            f"{model_dir} must be a ModelStore root holding exactly one model, found {len(stored)}"
        )
    return stored[0]


def _same_model(a: ModelRef, b: ModelRef) -> bool:
    return (a.recipe_id, a.role_id, a.roi_id, a.model_key_fs) == (b.recipe_id, b.role_id, b.roi_id, b.model_key_fs)


def export_model_dir(*, store: ModelStore, ref: ModelRef, dest: Path) -> ArtifactPaths:
    """Copy one model (memory + index as a verified pair, and its calibration) into a fresh
    ModelStore root ``dest``, in the current layout: the folder :func:`register_model` logs.

    Raises:
        NotFittedError: ``ref`` has no memory in ``store``.
        StorageError: ``dest`` already holds another model.
    """
    model = store.load_model(ref)
    if model is None:
        raise NotFittedError("register")
    target = ModelStore(dest)
    others = [s for s in target.list_models() if not _same_model(s.ref, ref)]
    if others:
        raise StorageError(f"{dest} already holds other models; export into an empty folder")
    paths = target.paths(ref)
    if model.index_path is not None:
        atomic_write_bytes(paths.index, model.index_path.read_bytes())
    else:
        paths.index.unlink(missing_ok=True)
    atomic_write_bytes(paths.memory, model.memory_path.read_bytes())
    calib = store.load_calibration(ref)
    if calib is not None:
        target.save_calibration(ref, calib)
    else:
        paths.calib.unlink(missing_ok=True)
    return paths


# ----------------------------------------------------------------------------------------- pyfunc


def recorded_feature_config(metadata: Mapping[str, Any], *, model_dir: Path,
                            overrides: Mapping[str, Any]) -> FeatureConfig:
    """The feature config recorded in ``metadata["features"]`` (the memory's), with the load-time
    ``overrides`` ``weights`` (a local file for pretrained weights), ``device``, ``precision`` and
    ``batch_size`` applied; empty override values keep the recorded value or the default."""
    from .config import FeatureConfig

    features = metadata.get("features")
    if not isinstance(features, Mapping):
        raise StorageError(f"the memory in {model_dir} records no feature config (metadata['features'])")
    recorded_weights = features.get("weights")
    weights: Mapping[str, Any] = recorded_weights if isinstance(recorded_weights, Mapping) else {}
    source = str(weights.get("source", ""))
    spec = source if source in ("random", "official") else str(weights.get("path") or "")
    given = {k: v for k, v in overrides.items() if v not in ("", None)}  # "" = keep the recorded value
    try:
        return FeatureConfig(
            backbone=str(features.get("backbone")),
            weights=str(given.get("weights", spec)),
            input_size=int(features["input_size"]),
            blocks=tuple(int(b) for b in features["blocks"]),
            neighbourhood=features.get("neighbourhood"),
            depth=int(features["depth"]) if features.get("depth") is not None else None,
            seed=int(weights.get("seed") or 0),
            device=given.get("device", "auto"),
            precision=given.get("precision", "auto"),
            batch_size=int(given.get("batch_size", FeatureConfig.batch_size)),
        ).resolved()
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"cannot rebuild the feature config of {model_dir}: {exc}") from exc


class ModelDirPredictor:
    """Scores images with the single model of a ModelStore root; what ``BdiPyfuncModel`` delegates to.

    Rebuilds the backbone recorded in the memory's metadata, checks that the weights are the recorded
    ones, and loads the model with :func:`bdi.model.load_patchcore` (the server's loader).
    """

    def __init__(self, model_dir: Path, *, overrides: Mapping[str, Any] | None = None) -> None:
        from .config import MemoryConfig, ScoringConfig, Settings
        from .features import FeatureExtractor
        from .model import load_patchcore

        self.model_dir = Path(model_dir)
        self.store = ModelStore(self.model_dir)
        self.ref = _single_model(self.model_dir).ref
        memory = self.store.load_memory(self.ref)
        if memory is None:
            raise NotFittedError("predict")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(PYFUNC_CONFIG_KEYS))
        if unknown:
            raise InvalidInputError(f"unknown model_config keys {unknown}; allowed: {list(PYFUNC_CONFIG_KEYS)}")
        features = recorded_feature_config(memory.metadata, model_dir=self.model_dir, overrides=overrides)
        cache_dir = overrides.get("weights_cache_dir") or Settings.model_fields["weights_cache_dir"].default
        extractor = FeatureExtractor(features, cache_dir=Path(cache_dir))
        _check_weights(recorded=memory.metadata["features"].get("weights") or {}, got=extractor.weights.to_dict())
        self.model = load_patchcore(
            self.store, self.ref, extractor=extractor, scoring=ScoringConfig().resolved(features.backbone),
            memory_cfg=MemoryConfig().resolved(features.backbone), endpoint="predict",
        )
        self.max_image_pixels: int = Settings.model_fields["max_image_pixels"].default

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows with ``image_path`` or ``image_bytes`` (and optional ``shape`` ROI JSON) →
        a frame with ``score`` (float), ``threshold`` (float) and ``decision`` ("ok"/"ng")."""
        import pandas as pd

        from .imaging import build_roi_mask, decode_image, parse_shape

        if "image_path" not in frame.columns and "image_bytes" not in frame.columns:
            raise InvalidInputError("the input needs an 'image_path' or an 'image_bytes' column")
        images, masks = [], []
        for i, row in enumerate(frame.to_dict("records")):
            data = row.get("image_bytes")
            if not isinstance(data, (bytes, bytearray)):
                path = row.get("image_path")
                if not isinstance(path, str) or not path:
                    raise InvalidInputError(f"row {i}: no image_bytes and no image_path")
                try:
                    data = Path(path).read_bytes()
                except OSError as exc:
                    raise InvalidInputError(f"row {i}: cannot read {path}: {exc}") from exc
            crop = decode_image(bytes(data), max_pixels=self.max_image_pixels, name=f"row {i}")
            shape = row.get("shape")
            shape = parse_shape(shape) if isinstance(shape, (str, Mapping)) and shape else None
            images.append(crop)
            masks.append(build_roi_mask(shape, width=crop.shape[1], height=crop.shape[0]))
        scores = [float(r.score) for r in self.model.score(images, masks)]
        return pd.DataFrame({
            "score": scores,
            "threshold": [self.model.threshold] * len(scores),
            "decision": [self.model.decide(s) for s in scores],
        })


def _check_weights(*, recorded: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """The rebuilt backbone must carry the weights the memory was fitted with (sha256, or name+seed)."""
    want_sha, got_sha = recorded.get("sha256"), got.get("sha256")
    if want_sha and got_sha != want_sha:
        raise WeightsError(
            f"the backbone weights have sha256 {got_sha}, but the model was fitted with {want_sha}; "
            "pass model_config={'weights': '<path to that file>'} when loading the model"
        )
    if not want_sha and recorded.get("name") and recorded.get("name") != got.get("name"):
        raise WeightsError(f"the backbone is {got.get('name')}, but the model was fitted with {recorded.get('name')}")


_PYFUNC_LOCK = threading.Lock()


def _build_pyfunc_class() -> type:
    import pandas as pd
    from mlflow.pyfunc.model import PythonModel

    def _predict(self: Any, context: Any, model_input: Any, params: Any = None) -> Any:
        return self._predictor.predict_frame(model_input)

    # Real objects, not strings (this module's annotations are postponed and pandas is imported
    # lazily): MLflow reads the hint when the class is created; a DataFrame hint means "no type-hint
    # schema, use the logged signature" (_pyfunc_signature).
    _predict.__annotations__ = {"context": Any, "model_input": pd.DataFrame, "params": dict[str, Any] | None,
                                "return": pd.DataFrame}

    class BdiPyfuncModel(PythonModel):
        """MLflow pyfunc over a ModelStore root: no algorithm here, only the bdi loader + service.

        Input: a DataFrame with ``image_path`` or ``image_bytes`` (optional ``shape``); output: ``score``,
        ``threshold``, ``decision`` per row (see :meth:`ModelDirPredictor.predict_frame`).
        """

        def load_context(self, context: Any) -> None:
            model_dir = Path(context.artifacts[MODEL_DIR_ARTIFACT])
            self._predictor = ModelDirPredictor(model_dir, overrides=dict(context.model_config or {}))

        predict = _predict

    # Importable as bdi.registry.BdiPyfuncModel, so cloudpickle stores a reference, not the code.
    BdiPyfuncModel.__module__ = __name__
    BdiPyfuncModel.__qualname__ = "BdiPyfuncModel"
    return BdiPyfuncModel


def pyfunc_model_class() -> type:
    """The ``BdiPyfuncModel`` class (an ``mlflow.pyfunc.PythonModel``), built once on first use."""
    with _PYFUNC_LOCK:
        cls = globals().get("BdiPyfuncModel")
        if cls is None:
            cls = _build_pyfunc_class()
            globals()["BdiPyfuncModel"] = cls
    return cls


def __getattr__(name: str) -> Any:
    """``from bdi.registry import BdiPyfuncModel`` works, and imports mlflow only then."""
    if name == "BdiPyfuncModel":
        return pyfunc_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pyfunc_signature() -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "image_path", required=False),
        ColSpec("binary", "image_bytes", required=False),
        ColSpec("string", "shape", required=False),
    ])
    outputs = Schema([ColSpec("double", "score"), ColSpec("double", "threshold"), ColSpec("string", "decision")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _pip_requirements() -> list[str]:
    import mlflow

    from . import __version__

    return [f"bdi=={__version__}", f"mlflow=={mlflow.__version__}", "pandas"]


# ----------------------------------------------------------------------------------------- register


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _ensure_registered_model(client: MlflowClient, name: str, *, tags: Mapping[str, str]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags=dict(tags))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def _version_metric(client: MlflowClient, version: ModelVersion, metric: str) -> float | None:
    """The version's ``metric.<name>`` tag, else its run's metric; None when neither exists."""
    tag = (version.tags or {}).get(f"{METRIC_TAG_PREFIX}{metric}")
    try:
        value = _finite(float(tag)) if tag is not None else None
    except ValueError:
        value = None
    if value is not None or not version.run_id:
        return value
    from mlflow.exceptions import MlflowException

    try:
        return _finite(client.get_run(version.run_id).data.metrics.get(metric))
    except MlflowException:
        return None


@contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    """MLflow failures (server down, bad URI, missing version) become :class:`StorageError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise StorageError(f"MLflow {action} failed: {exc.message}") from exc


def register_model(
    *,
    cfg: TrackingConfig,
    project_root: Path,
    run_id: str,
    model_dir: Path,
    ref: ModelRef,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    primary_metric: str = "image_auroc",
    move_alias: bool = True,
) -> RegistrationResult:
    """Log ``model_dir`` (a ModelStore root holding only ``ref``) as a pyfunc into run ``run_id``,
    register it as a new version, and move ``cfg.alias`` to it only when
    ``metrics[primary_metric]`` ≥ the current holder's (no holder → move). With ``move_alias=False``
    the alias is left alone (``bdi.promotion.promote_version`` decides with the whole gate).

    The version is tagged with ``tags`` (e.g. ``dvc_commit``, ``dvc_params_hash``), the ids, the memory
    fingerprint, the weights identity (``weights_sha256`` …) and every metric as ``metric.<name>``.

    Raises:
        InvalidInputError: tracking disabled, primary metric missing/not finite, or a model dir that
            does not hold exactly ``ref``.
    """
    if not cfg.enabled:
        raise InvalidInputError("MLflow tracking is disabled (TrackingConfig.enabled=false): cannot register")
    primary = _finite(metrics.get(primary_metric))
    if primary is None:
        raise InvalidInputError(
            f"metric {primary_metric!r} is missing or not finite ({metrics.get(primary_metric)!r}); "
            "it decides whether the alias moves"
        )
    model_dir = Path(model_dir).resolve()
    stored = _single_model(model_dir)
    if not _same_model(stored.ref, ref):
        raise InvalidInputError(f"{model_dir} holds {stored.ref}, not {ref}")
    memory = ModelStore(model_dir).load_memory(stored.ref)
    if memory is None:
        raise NotFittedError("register")
    uri = resolve_tracking_uri(cfg, project_root=project_root)[0]
    with _mlflow_errors("registration"), global_tracking_uri(uri):
        client = tracking_client(cfg, project_root=project_root)[0]
        name = registered_model_name(cfg.registered_model_prefix, recipe_id=ref.recipe_id, role_id=ref.role_id,
                                     roi_id=ref.roi_id)
        identity = {
            "recipe_id": ref.recipe_id, "role_id": ref.role_id, "roi_id": ref.roi_id, "model_key": ref.model_key,
            "memory_fingerprint": memory.fingerprint, "weights_sha256": "", **weights_identity(memory.metadata),
        }
        metric_tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in
                       ((k, _finite(v)) for k, v in metrics.items()) if v is not None}
        version_tags = {**{k: str(v) for k, v in tags.items() if v is not None}, **identity, **metric_tags,
                        "primary_metric": primary_metric, "source_run_id": run_id}
        number = _log_model_version(client, uri=uri, run_id=run_id, name=name, model_dir=model_dir,
                                    identity=identity, version_tags=version_tags)

        holder = _alias_holder(client, name, cfg.alias)
        previous = int(holder.version) if holder is not None else None
        held_value = _version_metric(client, holder, primary_metric) if holder is not None else None
        move = move_alias and (holder is None or held_value is None or primary >= held_value)
        if move:
            client.set_registered_model_alias(name, cfg.alias, str(number))
        client.set_tag(run_id, "registered_model", f"{name}/{number}")
        slog("registry.registered", name=name, version=number, alias=cfg.alias, alias_moved=move,
             previous_version=previous, primary_metric=primary_metric, value=primary, holder_value=held_value,
             model_key=ref.model_key)
        return RegistrationResult(name=name, version=number, alias=cfg.alias, alias_moved=move,
                                  previous_version=previous)


def _log_model_version(
    client: MlflowClient,
    *,
    uri: str,
    run_id: str,
    name: str,
    model_dir: Path,
    identity: Mapping[str, Any],
    version_tags: dict[str, str],
) -> int:
    """Log ``model_dir`` as the pyfunc of run ``run_id`` and register it as a new version of ``name``."""
    import mlflow.pyfunc

    with fluent_scope(uri, run_id=run_id), warnings.catch_warnings():
        # Expected: no input example (the input names image files that exist only at predict time).
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_NAME,
            python_model=pyfunc_model_class()(),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
            pip_requirements=_pip_requirements(),
            signature=_pyfunc_signature(),
            model_config={key: "" for key in PYFUNC_CONFIG_KEYS},
            metadata={"bdi": {**identity, "registered_model_name": name}},
        )
    _ensure_registered_model(client, name, tags={k: identity[k] for k in ("recipe_id", "role_id", "roi_id")})
    version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=version_tags,
                                          model_id=info.model_id)
    return int(version.version)


# ----------------------------------------------------------------------------------------- sync


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


def _downloaded_model_dir(local: Path) -> Path:
    from mlflow.models import Model

    mlmodel = Model.load(str(local))
    artifacts = (mlmodel.flavors.get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get(MODEL_DIR_ARTIFACT)
    if not isinstance(entry, Mapping) or "path" not in entry:
        raise StorageError(f"the model at {local} is not a bdi model: no '{MODEL_DIR_ARTIFACT}' artefact")
    return local / str(entry["path"])


def sync_registered(
    *,
    cfg: TrackingConfig,
    project_root: Path,
    models_dir: Path,
    alias: str | None = None,
    exports_root: Path | None = None,
) -> list[SyncedModel]:
    """Write every ``<prefix>.*`` registered version holding ``alias`` (default ``cfg.alias``) into
    ``models_dir`` at the exact ModelStore paths (:func:`sync_registry`); returns the versions whose
    files changed. Running it twice writes nothing the second time.
    """
    return sync_registry(cfg=cfg, project_root=project_root, models_dir=models_dir, alias=alias,
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
    cfg: TrackingConfig,
    project_root: Path,
    models_dir: Path,
    alias: str | None = None,
    exports_root: Path | None = None,
) -> SyncReport:
    """Make ``models_dir`` hold every ``<prefix>.*`` registered version that holds ``alias``.

    Per version: when the model's lineage sidecar already names that version (and its memory is there)
    nothing is downloaded; otherwise the version is downloaded into a temp folder inside ``models_dir``
    (same filesystem) and its memory, index, calibration and a new lineage sidecar replace the model's
    files together, under the model's exclusive lock (:mod:`bdi.model_lock`), so a reader sees all old
    files or all new ones. The registry wins over an API-fitted model of the same key (logged as
    ``registry.replaced_local``). A sidecar whose registered model no longer holds the alias is
    released (``managed: false``): the files stay and the API may write the model again.
    Syncs of one models dir are serialised by a file lock. A version that carries the export of its
    feature net (``exports/<key>``, see ``bdi.export``) has it copied into ``exports_root`` (the servers'
    export cache) when given; a version without one syncs all the same.

    Raises:
        StorageError: MLflow unreachable or failing, or the models dir not writable.
    """
    if not cfg.enabled:
        raise InvalidInputError("MLflow tracking is disabled (TrackingConfig.enabled=false): cannot sync")
    uri = resolve_tracking_uri(cfg, project_root=project_root)[0]
    with _mlflow_errors("sync"), global_tracking_uri(uri):
        return _sync(cfg=cfg, project_root=project_root, models_dir=models_dir, alias=alias or cfg.alias,
                     exports_root=exports_root)


def _sync_exports(model_dir: Path, exports_root: Path) -> list[str]:
    """Copy the exports a downloaded version carries into ``exports_root``; returns the keys copied."""
    from .config import EXPORTS_DIRNAME
    from .errors import ExportError
    from .export import copy_export

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


def _sync(*, cfg: TrackingConfig, project_root: Path, models_dir: Path, alias: str,
          exports_root: Path | None = None) -> SyncReport:
    from mlflow.exceptions import MlflowException

    client, uri, _ = tracking_client(cfg, project_root=project_root)
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
            for registered in _registered_models(client, cfg.registered_model_prefix):
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
            released = _release_unheld(target, prefix=cfg.registered_model_prefix, alias=alias, held=set(holders))
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


def download_version(*, name: str, version: int, uri: str, dest: Path) -> Path:
    """Download registered version ``name``/``version`` into ``dest``; returns its ModelStore root (the
    pyfunc's ``model_dir`` artefact). Call inside :func:`global_tracking_uri` / ``_mlflow_errors``."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dest), tracking_uri=uri, registry_uri=uri,
    )
    return _downloaded_model_dir(Path(local))


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
        ref = _single_model(model_dir).ref
        source = ModelStore(model_dir)
        memory = source.load_memory(ref)
        if memory is None:
            raise StorageError(f"{name} version {version} has no memory file")
        calib = source.load_calibration(ref) or {}
        lineage = Lineage(
            source=SOURCE_REGISTRY, memory_fingerprint=memory.fingerprint, managed=True, registered_model=name,
            registered_version=version, registered_alias=alias, mlflow_run_id=mv.run_id or None,
            git_commit=tags.get("git_commit") or tags.get("dvc_commit") or None,
            data_hash=tags.get("data_hash") or None, data_source=tags.get("data_source") or None,
            calibration_run_id=tags.get("calibration_run_id") or None,
            calibration_threshold=_finite(calib.get("threshold")),
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
