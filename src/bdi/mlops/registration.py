"""MLflow model registry, the writing side: register a fitted ModelStore model and guard the alias.

:func:`register_model` logs the model as a pyfunc (:mod:`bdi.mlops.pyfunc`, class ``bdi.registry.BdiPyfuncModel``)
whose one artefact is a ModelStore root holding exactly that model (memory, index, calibration; see
:func:`export_model_dir`), registers it as a new version of ``<prefix>.<recipe>.<role>.<roi>.<hash>``,
tags it (ids, weights identity, metrics, DVC params hash …) and moves the alias (``champion``) only when
the primary metric is at least as good as the current holder's. No stages. :func:`download_version`
fetches a version's ModelStore root back (:mod:`bdi.mlops.registry_sync`, :mod:`bdi.mlops.promotion`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdi.errors import InvalidInputError, NotFittedError, StorageError
from bdi.logging import slog
from bdi.mlops.params import weights_identity
from bdi.mlops.pyfunc import MODEL_DIR_ARTIFACT, PYFUNC_CONFIG_KEYS, model_signature, pip_requirements, single_model
from bdi.mlops.tracking import TrackingTarget, fluent_scope, global_tracking_uri
from bdi.refs import ModelRef
from bdi.registry import pyfunc_model_class
from bdi.storage.fsio import atomic_write_bytes
from bdi.storage.store import ArtifactPaths, ModelStore

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

MODEL_ARTIFACT_NAME = "model"  # the logged model's name inside the run
METRIC_TAG_PREFIX = "metric."
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


@dataclass(frozen=True)
class RegistrationResult:
    """A registered version and what happened to the alias (``previous_version`` = holder before)."""

    name: str
    version: int
    alias: str
    alias_moved: bool
    previous_version: int | None


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
    store.calibrations.copy(ref, target=target.calibrations)  # as stored: the registered file is the served one
    return paths


def finite_float(value: Any) -> float | None:
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


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def _version_metric(client: MlflowClient, version: ModelVersion, metric: str) -> float | None:
    """The version's ``metric.<name>`` tag, else its run's metric; None when neither exists."""
    tag = (version.tags or {}).get(f"{METRIC_TAG_PREFIX}{metric}")
    try:
        value = finite_float(float(tag)) if tag is not None else None
    except ValueError:
        value = None
    if value is not None or not version.run_id:
        return value
    from mlflow.exceptions import MlflowException

    try:
        return finite_float(client.get_run(version.run_id).data.metrics.get(metric))
    except MlflowException:
        return None


@contextmanager
def mlflow_errors(action: str) -> Iterator[None]:
    """MLflow failures (server down, bad URI, missing version) become :class:`StorageError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise StorageError(f"MLflow {action} failed: {exc.message}") from exc


def register_model(
    *,
    tracking: TrackingTarget,
    run_id: str,
    model_dir: Path,
    ref: ModelRef,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    primary_metric: str = "image_auroc",
    move_alias: bool = True,
) -> RegistrationResult:
    """Log ``model_dir`` (a ModelStore root holding only ``ref``) as a pyfunc into run ``run_id``,
    register it as a new version, and move ``tracking.alias`` to it only when
    ``metrics[primary_metric]`` ≥ the current holder's (no holder → move). With ``move_alias=False``
    the alias is left alone (``bdi.mlops.promotion.promote_version`` decides with the whole gate).

    The version is tagged with ``tags`` (e.g. ``dvc_commit``, ``dvc_params_hash``), the ids, the memory
    fingerprint, the weights identity (``weights_sha256`` …) and every metric as ``metric.<name>``.

    Raises:
        InvalidInputError: tracking disabled, primary metric missing/not finite, or a model dir that
            does not hold exactly ``ref``.
    """
    if not tracking.enabled:
        raise InvalidInputError("MLflow tracking is disabled (TrackingConfig.enabled=false): cannot register")
    primary = finite_float(metrics.get(primary_metric))
    if primary is None:
        raise InvalidInputError(
            f"metric {primary_metric!r} is missing or not finite ({metrics.get(primary_metric)!r}); "
            "it decides whether the alias moves"
        )
    model_dir = Path(model_dir).resolve()
    stored = single_model(model_dir)
    if not _same_model(stored.ref, ref):
        raise InvalidInputError(f"{model_dir} holds {stored.ref}, not {ref}")
    memory = ModelStore(model_dir).load_memory(stored.ref)
    if memory is None:
        raise NotFittedError("register")
    uri = tracking.tracking_uri
    with mlflow_errors("registration"), global_tracking_uri(uri):
        client = tracking.client()
        name = registered_model_name(tracking.registered_model_prefix, recipe_id=ref.recipe_id, role_id=ref.role_id,
                                     roi_id=ref.roi_id)
        identity = {
            **ref.to_dict(),
            "memory_fingerprint": memory.fingerprint, "weights_sha256": "", **weights_identity(memory.metadata),
        }
        metric_tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in
                       ((k, finite_float(v)) for k, v in metrics.items()) if v is not None}
        version_tags = {**{k: str(v) for k, v in tags.items() if v is not None}, **identity, **metric_tags,
                        "primary_metric": primary_metric, "source_run_id": run_id}
        number = _log_model_version(client, uri=uri, run_id=run_id, name=name, model_dir=model_dir,
                                    identity=identity, version_tags=version_tags)

        holder = alias_holder(client, name, tracking.alias)
        previous = int(holder.version) if holder is not None else None
        held_value = _version_metric(client, holder, primary_metric) if holder is not None else None
        move = move_alias and (holder is None or held_value is None or primary >= held_value)
        if move:
            client.set_registered_model_alias(name, tracking.alias, str(number))
        client.set_tag(run_id, "registered_model", f"{name}/{number}")
        slog("registry.registered", name=name, version=number, alias=tracking.alias, alias_moved=move,
             previous_version=previous, primary_metric=primary_metric, value=primary, holder_value=held_value,
             model_key=ref.model_key)
        return RegistrationResult(name=name, version=number, alias=tracking.alias, alias_moved=move,
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
            pip_requirements=pip_requirements(),
            signature=model_signature(),
            model_config={key: "" for key in PYFUNC_CONFIG_KEYS},
            metadata={"bdi": {**identity, "registered_model_name": name}},
        )
    _ensure_registered_model(client, name, tags={k: identity[k] for k in ("recipe_id", "role_id", "roi_id")})
    version = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=version_tags,
                                          model_id=info.model_id)
    return int(version.version)


def download_version(*, name: str, version: int, uri: str, dest: Path) -> Path:
    """Download registered version ``name``/``version`` into ``dest``; returns its ModelStore root (the
    pyfunc's ``model_dir`` artefact). Call inside :func:`global_tracking_uri` / :func:`mlflow_errors`."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dest), tracking_uri=uri, registry_uri=uri,
    )
    return _downloaded_model_dir(Path(local))


def _downloaded_model_dir(local: Path) -> Path:
    from mlflow.models import Model

    mlmodel = Model.load(str(local))
    artifacts = (mlmodel.flavors.get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get(MODEL_DIR_ARTIFACT)
    if not isinstance(entry, Mapping) or "path" not in entry:
        raise StorageError(f"the model at {local} is not a bdi model: no '{MODEL_DIR_ARTIFACT}' artefact")
    return local / str(entry["path"])
