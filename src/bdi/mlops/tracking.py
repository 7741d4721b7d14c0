"""MLflow tracking: where runs go (resolved once into a :class:`TrackingTarget`) and one run as a
context manager. Values: :mod:`bdi.mlops.params`; server checks and orphaned runs:
:mod:`bdi.mlops.outages`; API-run logging: :mod:`bdi.mlops.api_runs`.

``mlflow`` is imported inside functions only, so ``import bdi`` stays light. Runs are driven through
an ``MlflowClient`` bound to the target's URI, never through MLflow's global active run or
tracking URI; the registry, where MLflow itself reads the globals, scopes them with
:func:`global_tracking_uri` / :func:`fluent_scope`.

Embedded default (an empty ``tracking_uri``): a SQLite file ``<project_root>/mlflow.db`` with the
artefacts in ``<project_root>/mlartifacts``; no server is needed and the registry works (it needs
a database backend). Any other tracking URI passes through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdi.config import Settings
from bdi.errors import InvalidInputError
from bdi.logging import slog
from bdi.mlops.params import clean_key, flatten_metrics, flatten_params, tag_value

if TYPE_CHECKING:  # pragma: no cover - typing only; never imported at runtime here
    from mlflow import MlflowClient


_LOG = logging.getLogger(__name__)

DEFAULT_DB_FILE = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
OWNER_PID_TAG = "bdi.pid"  # the process that owns a run (see bdi.mlops.outages.reap_orphaned_runs)
OWNER_HOST_TAG = "bdi.host"
_BATCH_PARAMS = 100  # MLflow log_batch limits
_BATCH_METRICS = 1000

# MLflow keeps the tracking URI and the active-run stack in process globals; every bdi call that
# must go through them holds this lock, so two threads never see each other's URI.
_FLUENT_LOCK = threading.RLock()


@dataclass(frozen=True)
class TrackingTarget:
    """Where MLflow runs and registered models live, resolved (:meth:`TrackingConfig.resolve`).

    ``tracking_uri`` is never empty; ``artifact_location`` "" lets the tracking server choose.
    ``embedded_root`` is the project folder holding the embedded SQLite default (None for any other URI).
    """

    tracking_uri: str
    artifact_location: str
    experiment: str
    registered_model_prefix: str
    alias: str
    enabled: bool
    embedded_root: Path | None = None

    def client(self) -> MlflowClient:
        """An ``MlflowClient`` bound to the URI (registry on the same URI); the embedded default's
        folder is created."""
        from mlflow import MlflowClient

        if self.embedded_root is not None:
            self.embedded_root.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow runs and registered models live, as configured (:meth:`resolve` makes it a target).

    ``tracking_uri`` "" = the embedded SQLite default under the project root; ``artifact_location``
    "" = ``<project_root>/mlartifacts`` with the embedded default, the server's default otherwise.
    """

    tracking_uri: str = ""
    artifact_location: str = ""
    experiment: str = "bdi"
    registered_model_prefix: str = "bdi"
    alias: str = "champion"
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise InvalidInputError("experiment must be a non-empty name")
        if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*", self.registered_model_prefix):
            raise InvalidInputError(
                f"registered_model_prefix {self.registered_model_prefix!r} must match [A-Za-z0-9_.-]+"
            )
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", self.alias) or self.alias.lower() == "latest":
            raise InvalidInputError(f"alias {self.alias!r} must be [A-Za-z0-9_-]+ and not 'latest'")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrackingConfig:
        """The tracking config named by the runtime settings (``BDI_MLFLOW_*``, ``BDI_REGISTRY_ALIAS``)."""
        values: dict[str, Any] = {
            "tracking_uri": settings.mlflow_tracking_uri,
            "experiment": settings.mlflow_experiment,
            "alias": settings.registry_alias,
        }
        values.update(overrides)
        return cls(**values)

    def resolve(self, project_root: Path) -> TrackingTarget:
        """The target: "" URI → the embedded SQLite + local artefact folder under ``project_root``.

        A relative ``artifact_location`` path is taken relative to ``project_root``; a URI passes through.
        The target's artifact location is "" when the tracking server should choose it.
        """
        root = Path(project_root).expanduser().resolve()
        artifact = self.artifact_location.strip()
        if artifact and "://" not in artifact and not artifact.startswith("file:"):
            path = Path(artifact).expanduser()
            artifact = (path if path.is_absolute() else root / path).resolve().as_uri()
        uri = self.tracking_uri.strip()
        embedded_root: Path | None = None
        if not uri:
            uri, embedded_root = f"sqlite:///{root / DEFAULT_DB_FILE}", root
            artifact = artifact or (root / DEFAULT_ARTIFACT_DIR).as_uri()
        elif not artifact and uri.startswith("sqlite:///"):
            # MLflow's own default would be ./mlruns under whatever the CWD is: keep artefacts beside the db.
            db_path = Path(uri.removeprefix("sqlite:///"))
            db_dir = db_path.parent if db_path.is_absolute() else (root / db_path).parent
            artifact = (db_dir / DEFAULT_ARTIFACT_DIR).resolve().as_uri()
        return TrackingTarget(tracking_uri=uri, artifact_location=artifact, experiment=self.experiment,
                              registered_model_prefix=self.registered_model_prefix, alias=self.alias,
                              enabled=self.enabled, embedded_root=embedded_root)


# ----------------------------------------------------------------------------------------- client


def ensure_experiment(client: MlflowClient, *, name: str, artifact_location: str) -> str:
    """The id of experiment ``name``, created (with ``artifact_location`` if given) when missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location or None))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # created concurrently by another process
        if experiment is None:
            raise
        return str(experiment.experiment_id)


@contextmanager
def global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at ``tracking_uri`` for the duration of the block.

    Some MLflow code paths ignore the client they are called through and use the global URI
    (``log_model``; the SQL registry resolving a ``models:/<model_id>`` source). The previous URI
    and ``MLFLOW_TRACKING_URI`` are restored afterwards, and scopes are serialised across threads.
    """
    import mlflow

    with _FLUENT_LOCK:
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        # is_tracking_uri_set is unannotated in mlflow
        uri_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # type: ignore[no-untyped-call]
        if uri_before == env_before:  # set through the variable only: restoring it restores the URI, pinning would
            uri_before = None  # keep it after the variable changes
        try:
            mlflow.set_tracking_uri(tracking_uri)
            yield
        finally:
            # None unsets the URI (mlflow handles it explicitly) though the signature says str | Path
            mlflow.set_tracking_uri(uri_before)  # type: ignore[arg-type]
            if env_before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


@contextmanager
def fluent_scope(tracking_uri: str, *, run_id: str) -> Iterator[None]:
    """:func:`global_tracking_uri` plus ``run_id`` as MLflow's active run, for fluent calls
    (``mlflow.pyfunc.log_model``). Resuming marks the run RUNNING; leaving marks it FINISHED.
    """
    import mlflow

    with global_tracking_uri(tracking_uri):
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield


# ----------------------------------------------------------------------------------------- runs


class RunHandle:
    """Logging into one MLflow run (a no-op handle with ``run_id == ""`` when tracking is disabled)."""

    def __init__(self, client: MlflowClient | None, run_id: str, *, tracking_uri: str = "") -> None:
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_params(self, mapping: Mapping[str, Any]) -> dict[str, str]:
        """Log nested params flattened with dots (see :func:`flatten_params`); returns what was logged."""
        flat = flatten_params(mapping)
        if self._client is None or not flat:
            return flat
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), _BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=items[start : start + _BATCH_PARAMS])
        return flat

    def log_metrics(self, mapping: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        """Log the finite numbers of a (nested) mapping; None/NaN/inf and non-numbers are skipped."""
        flat = flatten_metrics(mapping)
        if self._client is None or not flat:
            return flat
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(k, v, now_ms, step or 0) for k, v in flat.items()]
        for start in range(0, len(items), _BATCH_METRICS):
            self._client.log_batch(self.run_id, metrics=items[start : start + _BATCH_METRICS])
        return flat

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path``."""
        if self._client is None:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store a JSON/YAML-able object as ``artifact_file`` (format from the extension)."""
        if self._client is not None:
            self._client.log_dict(self.run_id, obj, artifact_file)

    def log_input(self, *, name: str, source: str, digest: str, context: str) -> None:
        """Log a dataset input, as ``mlflow.log_input`` does: a metadata-only dataset (``name``, local
        ``source`` folder, ``digest`` ≤ 36 chars) with the ``mlflow.data.context`` tag ``context``."""
        if self._client is None:
            return
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(Path(source).resolve().as_uri())
        # MLflow declares ``profile`` abstract but MetaDataset works without it
        dataset = MetaDataset(resolved, name=name, digest=digest)  # type: ignore[abstract]
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self._client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])

    def set_tags(self, mapping: Mapping[str, Any]) -> None:
        """Set tags (values stringified, None skipped)."""
        if self._client is None:
            return
        from mlflow.entities import RunTag

        tags = [RunTag(clean_key(str(k)), tag_value(v))
                for k, v in mapping.items() if v is not None]
        if tags:
            self._client.log_batch(self.run_id, tags=tags)


def _end_run(client: MlflowClient, run_id: str, exc: BaseException | None) -> None:
    """Mark a run FINISHED, FAILED (an exception) or KILLED (an interrupt); an error doing so is logged when
    the body already raised (its exception is the one to see)."""
    status = "FINISHED" if exc is None else "FAILED" if isinstance(exc, Exception) else "KILLED"
    if exc is None:
        client.set_terminated(run_id, status=status)
        return
    try:
        client.set_terminated(run_id, status=status)
    except Exception as end_exc:  # noqa: BLE001 - keep the body's exception, report this one
        slog("tracking.error", kind="end_run", run_id=run_id, error=str(end_exc))


@contextmanager
def tracked_run(
    tracking: TrackingTarget,
    *,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[RunHandle]:
    """One MLflow run in ``tracking.experiment`` (created with its artefact location when missing).

    Ends FINISHED, FAILED when the body raises (the exception propagates) or KILLED on an interrupt.
    With ``tracking.enabled`` false it yields a no-op handle. Tag values are stringified; None values are skipped.
    The run is tagged with the process that owns it (``bdi.pid``, ``bdi.host``), so a run left RUNNING
    by a killed process can be told from a live one (:func:`bdi.mlops.outages.reap_orphaned_runs`).
    ``parent_run_id``: the run is nested under it (``mlflow.parentRunId``, as ``mlflow.start_run(nested=True)``).
    """
    if not tracking.enabled:
        yield RunHandle(None, "")
        return
    client = tracking.client()
    experiment_id = ensure_experiment(client, name=tracking.experiment, artifact_location=tracking.artifact_location)
    owner = {OWNER_PID_TAG: str(os.getpid()), OWNER_HOST_TAG: socket.gethostname()}  # see reap_orphaned_runs
    nesting = {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}
    clean_tags = {k: tag_value(v) for k, v in {**owner, **(tags or {}), **nesting}.items()
                  if v is not None}
    run = client.create_run(experiment_id, run_name=run_name, tags=clean_tags)
    handle = RunHandle(client, run.info.run_id, tracking_uri=tracking.tracking_uri)
    try:
        if params:
            handle.log_params(params)
        yield handle
    except BaseException as exc:
        _end_run(client, run.info.run_id, exc)
        raise
    _end_run(client, run.info.run_id, None)


# ----------------------------------------------------------------------------------------- executions

PARENT_RUN_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
EXECUTION_TAG = "bdi.execution"  # the key of one pipeline execution, on its parent run


def find_execution_run(tracking: TrackingTarget, *, key: str) -> str | None:
    """The id of the parent run tagged ``bdi.execution = key`` (the latest when several), None when none."""
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    if "'" in key:
        raise InvalidInputError(f"an execution key holds no quote: {key!r}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return str(runs[0].info.run_id) if runs else None


@contextmanager
def execution_run(
    tracking: TrackingTarget,
    *,
    key: str,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Iterator[RunHandle]:
    """The parent run of one execution made of several processes (the stages of one ``dvc repro``): found
    by ``key`` (tag ``bdi.execution``) or created, marked RUNNING for the block and ended as
    :func:`tracked_run` ends a run, so it is closed whichever stage runs last (or alone, the others cached).

    ``params`` that the run does not hold yet are logged (MLflow refuses to change a logged param); ``tags``
    are (re)set. A no-op handle when tracking is disabled.
    """
    if not tracking.enabled:
        yield RunHandle(None, "")
        return
    client = tracking.client()
    experiment_id = ensure_experiment(client, name=tracking.experiment, artifact_location=tracking.artifact_location)
    run_id = find_execution_run(tracking, key=key)
    if run_id is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={EXECUTION_TAG: key})
        run_id, held = str(run.info.run_id), {}
    else:
        client.update_run(run_id, status="RUNNING")
        held = client.get_run(run_id).data.params
    handle = RunHandle(client, run_id, tracking_uri=tracking.tracking_uri)
    try:
        handle.set_tags({**(tags or {}), EXECUTION_TAG: key})
        if params:
            handle.log_params({k: v for k, v in flatten_params(params).items() if k not in held})
        yield handle
    except BaseException as exc:
        _end_run(client, run_id, exc)
        raise
    _end_run(client, run_id, None)
