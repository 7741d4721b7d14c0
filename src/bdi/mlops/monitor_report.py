"""``bdi monitor report``: each model's drift (bdi.monitoring.drift) logged on the MLflow run of that model, so the
MLflow UI shows it next to the calibration (docs/monitoring.md "In MLflow").

The run is, in order: the calibration run the registry sidecar names (a registered model), the model's own run
(``mlflow_run_id`` of the sidecar), the newest ``kind=calibrate`` run tagged with the memory fingerprint (an API
calibration), the newest run with that fingerprint; else a new ``kind=monitor`` run tagged with it. Metrics are
``monitor.<series>_<statistic>`` (the step is the report's UNIX time, so reports chart over time), tags
``monitor.status``/``monitor.cause``/``monitor.since``, and the whole report ``monitoring/drift_<time>.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bdi.logging import slog
from bdi.mlops.tracking import RunHandle, TrackingTarget, ensure_experiment, tracked_run
from bdi.monitoring.drift import RoiDrift
from bdi.refs import ModelRef
from bdi.storage.lineage import read_lineage
from bdi.storage.store import ModelStore

METRIC_PREFIX = "monitor."


@dataclass(frozen=True)
class ReportedDrift:
    """Where one model's drift went: the run id and whether the run was made for it."""

    key: str
    run_id: str
    created: bool


def _model_run(client: object, experiment_id: str, *, fingerprint: str) -> str | None:
    """The newest run tagged with the fingerprint, calibration runs first."""
    for extra in (" and tags.kind = 'calibrate'", ""):
        runs = client.search_runs(  # type: ignore[attr-defined]
            [experiment_id], filter_string=f"tags.memory_fingerprint = '{fingerprint}'{extra}",
            order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return str(runs[0].info.run_id)
    return None


def report_drift(tracking: TrackingTarget, store: ModelStore, drifts: Sequence[RoiDrift]) -> list[ReportedDrift]:
    """Log each evaluated drift (a model with a memory fingerprint) on its model's run; where each went."""
    if not tracking.enabled:
        return []
    client = tracking.client()
    experiment_id = ensure_experiment(client, name=tracking.experiment, artifact_location=tracking.artifact_location)
    step = int(time.time())
    out: list[ReportedDrift] = []
    for drift in drifts:
        if drift.memory_fingerprint is None:
            continue
        ref = ModelRef(recipe_id=drift.recipe_id, role_id=drift.role_id, roi_id=drift.roi_id,
                       model_key=drift.model_key)
        lineage = read_lineage(store, ref)
        run_id: str | None = None
        if lineage is not None and lineage.memory_fingerprint == drift.memory_fingerprint:
            run_id = lineage.calibration_run_id or lineage.mlflow_run_id
        run_id = run_id or _model_run(client, experiment_id, fingerprint=drift.memory_fingerprint)
        created = run_id is None
        if run_id is None:
            with tracked_run(tracking, run_name=f"monitor-{drift.recipe_id}-{drift.model_key}",
                             tags={"kind": "monitor", **ref.to_dict(),
                                   "memory_fingerprint": drift.memory_fingerprint}) as run:
                run_id = run.run_id
        handle = RunHandle(client, run_id, tracking_uri=tracking.tracking_uri)
        handle.log_metrics({f"{METRIC_PREFIX}{k}": v for k, v in drift.statistics().items()}
                           | {f"{METRIC_PREFIX}level": drift.level, f"{METRIC_PREFIX}n_live": drift.n_live},
                           step=step)
        handle.set_tags({f"{METRIC_PREFIX}status": drift.status, f"{METRIC_PREFIX}cause": drift.cause or "none",
                         f"{METRIC_PREFIX}since": drift.since})
        handle.log_dict(drift.to_dict(), f"monitoring/drift_{step}.json")
        slog("monitor.reported", run_id=run_id, model_key=drift.model_key, status=drift.status, created=created)
        out.append(ReportedDrift(key=drift.key, run_id=run_id, created=created))
    return out
