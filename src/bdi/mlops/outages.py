"""MLflow slow, down or abandoned: bounded HTTP calls, the status /health reports, the start-up check
of the tracking server, and the runs a killed process left RUNNING."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bdi.mlops.tracking import OWNER_HOST_TAG, OWNER_PID_TAG, TrackingTarget

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


def check_tracking_server(tracking: TrackingTarget) -> None:
    """One cheap call to the tracking server (list one experiment); raises when it cannot answer."""
    tracking.client().search_experiments(max_results=1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def reap_orphaned_runs(tracking: TrackingTarget, *, is_alive: Callable[[int], bool] = _pid_alive) -> list[str]:
    """Mark KILLED the runs of ``tracking.experiment`` left RUNNING by a process of this host that is gone
    (killed mid-run: nothing could end them). Runs of live processes, of other hosts or without the
    owner tags of :func:`bdi.mlops.tracking.tracked_run` are left alone. Returns the run ids marked."""
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment)
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
