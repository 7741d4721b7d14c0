"""MLflow tracking: where runs go and one run as a context manager (API-run logging: :mod:`bdi.mlops.api_runs`).

``mlflow`` is imported inside functions only, so ``import bdi`` stays light. Runs are driven through
an ``MlflowClient`` bound to the configured URI, never through MLflow's global active run or
tracking URI; the registry, where MLflow itself reads the globals, scopes them with
:func:`global_tracking_uri` / :func:`fluent_scope`.

Embedded default (an empty ``tracking_uri``): a SQLite file ``<project_root>/mlflow.db`` with the
artefacts in ``<project_root>/mlartifacts``; no server is needed and the registry works (it needs
a database backend). Any other tracking URI passes through unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdi.config import Settings
from bdi.errors import InvalidInputError
from bdi.logging import slog

if TYPE_CHECKING:  # pragma: no cover - typing only; never imported at runtime here
    from mlflow import MlflowClient


_LOG = logging.getLogger(__name__)

DEFAULT_DB_FILE = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
PARAM_VALUE_MAX_CHARS = 500  # the historical MLflow limit; newer servers accept more
PARAM_KEY_MAX_CHARS = 250
TAG_VALUE_MAX_CHARS = 5000
_BATCH_PARAMS = 100  # MLflow log_batch limits
_BATCH_METRICS = 1000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_TRUNCATION_MARK = "..."

# MLflow keeps the tracking URI and the active-run stack in process globals; every bdi call that
# must go through them holds this lock, so two threads never see each other's URI.
_FLUENT_LOCK = threading.RLock()


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow runs and registered models live.

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


def resolve_tracking_uri(cfg: TrackingConfig, *, project_root: Path) -> tuple[str, str]:
    """``(tracking_uri, artifact_location)``; "" URI → the embedded SQLite + local artefact folder.

    A relative ``artifact_location`` path is taken relative to ``project_root``; a URI passes through.
    The returned artifact location is "" when the tracking server should choose it.
    """
    root = Path(project_root).expanduser().resolve()
    artifact = cfg.artifact_location.strip()
    if artifact and "://" not in artifact and not artifact.startswith("file:"):
        path = Path(artifact).expanduser()
        artifact = (path if path.is_absolute() else root / path).resolve().as_uri()
    uri = cfg.tracking_uri.strip()
    if not uri:
        return f"sqlite:///{root / DEFAULT_DB_FILE}", artifact or (root / DEFAULT_ARTIFACT_DIR).as_uri()
    if not artifact and uri.startswith("sqlite:///"):
        # MLflow's own default would be ./mlruns under whatever the CWD is: keep artefacts beside the db.
        db_path = Path(uri.removeprefix("sqlite:///"))
        db_dir = db_path.parent if db_path.is_absolute() else (root / db_path).parent
        artifact = (db_dir / DEFAULT_ARTIFACT_DIR).resolve().as_uri()
    return uri, artifact


# ----------------------------------------------------------------------------------------- values


def _clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:PARAM_KEY_MAX_CHARS]


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        try:
            return json.dumps(items, sort_keys=True, default=str)
        except (TypeError, ValueError):
            return str(items)
    tolist = getattr(value, "tolist", None)  # numpy scalars/arrays
    if callable(tolist) and not isinstance(value, (int, float, bool)):
        return _stringify(tolist())
    return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def flatten_params(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings → ``{"a.b.c": "value"}``; values stringified (lists as JSON), ≤ 500 chars.

    Keys are made MLflow-safe (characters outside ``[A-Za-z0-9_-. /]`` become ``_``).
    """
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name))
        else:
            out[_clean_key(name)] = _truncate(_stringify(value), PARAM_VALUE_MAX_CHARS)
    return out


def flatten_metrics(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested mappings → ``{"a.b": float}``, keeping only finite numbers (None, NaN, text skipped)."""
    out: dict[str, float] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name))
            continue
        if value is None or isinstance(value, str):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[_clean_key(name)] = number
    return out


# ----------------------------------------------------------------------------------------- client


def tracking_client(cfg: TrackingConfig, *, project_root: Path) -> tuple[MlflowClient, str, str]:
    """An ``MlflowClient`` bound to the resolved URI (registry on the same URI).

    Returns ``(client, tracking_uri, artifact_location)``. The embedded default's folder is created.
    """
    from mlflow import MlflowClient

    uri, artifact_location = resolve_tracking_uri(cfg, project_root=project_root)
    if not cfg.tracking_uri.strip():
        Path(project_root).expanduser().resolve().mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri, artifact_location


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

        tags = [RunTag(_clean_key(str(k)), _truncate(_stringify(v), TAG_VALUE_MAX_CHARS))
                for k, v in mapping.items() if v is not None]
        if tags:
            self._client.log_batch(self.run_id, tags=tags)


@contextmanager
def tracked_run(
    cfg: TrackingConfig,
    *,
    project_root: Path,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> Iterator[RunHandle]:
    """One MLflow run in ``cfg.experiment`` (created with its artefact location when missing).

    Ends FINISHED, FAILED when the body raises (the exception propagates) or KILLED on an interrupt.
    With ``cfg.enabled`` false it yields a no-op handle. Tag values are stringified; None values are skipped.
    The run is tagged with the process that owns it (``bdi.pid``, ``bdi.host``), so a run left RUNNING
    by a killed process can be told from a live one (:func:`reap_orphaned_runs`).
    """
    if not cfg.enabled:
        yield RunHandle(None, "")
        return
    client, uri, artifact_location = tracking_client(cfg, project_root=project_root)
    experiment_id = ensure_experiment(client, name=cfg.experiment, artifact_location=artifact_location)
    owner = {OWNER_PID_TAG: str(os.getpid()), OWNER_HOST_TAG: socket.gethostname()}  # see reap_orphaned_runs
    clean_tags = {k: _truncate(_stringify(v), TAG_VALUE_MAX_CHARS) for k, v in {**owner, **(tags or {})}.items()
                  if v is not None}
    run = client.create_run(experiment_id, run_name=run_name, tags=clean_tags)
    handle = RunHandle(client, run.info.run_id, tracking_uri=uri)
    try:
        if params:
            handle.log_params(params)
        yield handle
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:
            client.set_terminated(run.info.run_id, status=status)
        except Exception as end_exc:  # noqa: BLE001 - keep the body's exception, report this one
            slog("tracking.error", kind="end_run", run_id=run.info.run_id, error=str(end_exc))
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


# ----------------------------------------------------------------------------------------- outages

OWNER_PID_TAG = "bdi.pid"
OWNER_HOST_TAG = "bdi.host"
_MLFLOW_HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
_MLFLOW_HTTP_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


@contextmanager
def bounded_mlflow_http(timeout_s: float) -> Iterator[None]:
    """While inside, every MLflow HTTP call of this process times out after ``timeout_s`` (whole
    seconds, at least 1) and is not retried; the previous settings are restored on exit.

    MLflow's defaults (120 s and 7 retries with backoff) keep one call against a stalled server busy
    for many minutes, and MLflow reads these only from the environment, at call time.
    """
    names = (_MLFLOW_HTTP_TIMEOUT_ENV, _MLFLOW_HTTP_RETRIES_ENV)
    before = {name: os.environ.get(name) for name in names}
    os.environ[_MLFLOW_HTTP_TIMEOUT_ENV] = str(max(1, math.ceil(timeout_s)))
    os.environ[_MLFLOW_HTTP_RETRIES_ENV] = "0"
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TrackingStatus:
    """What ``/health`` reports about the MLflow tracking server / registry, without any I/O.

    ``disabled`` (none configured), ``checking`` (the start-up check runs), ``ok`` (the last call
    worked) or ``unreachable`` (the last call failed; ``error`` says how). Thread-safe.
    """

    def __init__(self, state: str = "disabled") -> None:
        self._lock = threading.Lock()
        self._state = state
        self._error: str | None = None
        self._since = time.time()

    def set(self, state: str, error: str | None = None) -> None:
        with self._lock:
            self._state, self._error, self._since = state, error, time.time()

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"status": self._state, "since_unix": round(self._since, 3)}
            if self._error:
                out["error"] = self._error
            return out


def check_tracking_server(cfg: TrackingConfig, *, project_root: Path) -> None:
    """One cheap call to the tracking server (list one experiment); raises when it cannot answer."""
    client, _, _ = tracking_client(cfg, project_root=project_root)
    client.search_experiments(max_results=1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def reap_orphaned_runs(
    cfg: TrackingConfig, *, project_root: Path, is_alive: Callable[[int], bool] = _pid_alive
) -> list[str]:
    """Mark KILLED the runs of ``cfg.experiment`` left RUNNING by a process of this host that is gone
    (killed mid-run: nothing could end them). Runs of live processes, of other hosts or without the
    owner tags of :func:`tracked_run` are left alone. Returns the run ids marked."""
    client, _, _ = tracking_client(cfg, project_root=project_root)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return []
    host = socket.gethostname()
    reaped: list[str] = []
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=1000)
    for run in runs:
        pid, run_host = run.data.tags.get(OWNER_PID_TAG, ""), run.data.tags.get(OWNER_HOST_TAG)
        if run_host != host or not pid.isdigit() or is_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "bdi.ended_by", "startup: owner process gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        reaped.append(run.info.run_id)
    return reaped


def weights_identity(metadata: Mapping[str, Any]) -> dict[str, str]:
    """``weights_name``/``weights_sha256``/``weights_source`` from a memory's metadata (``features.weights``)."""
    features = metadata.get("features")
    weights = features.get("weights") if isinstance(features, Mapping) else None
    if not isinstance(weights, Mapping):
        return {}
    out = {"weights_name": weights.get("name"), "weights_source": weights.get("source"),
           "weights_sha256": weights.get("sha256") or ""}
    return {k: str(v) for k, v in out.items() if v is not None}
