"""MLflow down (issue 16): a real loopback port that accepts connections and never answers.

Nothing about the server may wait on it: start-up, fits, /health and shutdown all stay bounded, and
/health says the registry is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from tests.helpers.stall import stalling_server
from tests.helpers.tiny import tiny_settings

from .conftest import MM, ROI, ROLE, upload

pytestmark = pytest.mark.slow  # real app start-ups with their own ViT, timing against a stalled port

TIMEOUT_S = 1.0


@pytest.fixture()
def stalled_uri() -> Iterator[str]:
    with stalling_server() as uri:
        yield uri


def _started(tmp_path: Path, name: str, **overrides: Any) -> tuple[TestClient, float]:
    settings = tiny_settings(tmp_path / name / "models", log_dir=tmp_path / name / "logs", **overrides)
    client = TestClient(create_app(settings))
    started = time.monotonic()
    client.__enter__()
    return client, time.monotonic() - started


def _wait_for_registry(client: TestClient, state: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = client.get("/health").json()
        if body["registry"]["state"] == state or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def _timed_fit(client: TestClient) -> float:
    started = time.monotonic()
    response = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM),
                                            "use_dataset": "true"})
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_startup_with_the_registry_unreachable_still_serves_and_health_says_so(
    tmp_path: Path, stalled_uri: str
) -> None:
    baseline, baseline_s = _started(tmp_path, "baseline")
    assert baseline.get("/health").json()["registry"]["state"] == "disabled"
    baseline.__exit__(None, None, None)
    client, startup_s = _started(tmp_path, "stalled", mlflow_tracking_uri=stalled_uri, registry_sync_on_start=True,
                                 mlflow_timeout_s=TIMEOUT_S)
    try:
        assert startup_s < baseline_s + 3 * TIMEOUT_S + 5  # the sync waited a bounded time, then served
        body = _wait_for_registry(client, "unreachable")
        assert body["status"] == "ok" and body["registry"]["state"] == "unreachable"
        upload(client, "ok", seeds=[1])  # and it serves
    finally:
        client.__exit__(None, None, None)


def test_api_fit_with_a_stalled_tracking_server_is_as_fast_as_without(tmp_path: Path, stalled_uri: str) -> None:
    timings = {}
    for name, overrides in (("untracked", {}), ("stalled", {"mlflow_tracking_uri": stalled_uri})):
        client, _ = _started(tmp_path, name, mlflow_timeout_s=TIMEOUT_S, mlflow_shutdown_timeout_s=1.0, **overrides)
        try:
            upload(client, "ok", seeds=range(10))
            _timed_fit(client)  # warm-up
            timings[name] = min(_timed_fit(client) for _ in range(2))
        finally:
            client.__exit__(None, None, None)
    assert timings["stalled"] < 1.5 * timings["untracked"] + 0.5, timings


def test_shutdown_with_runs_stuck_on_a_stalled_server_is_bounded(tmp_path: Path, stalled_uri: str) -> None:
    client, _ = _started(tmp_path, "stalled", mlflow_tracking_uri=stalled_uri, mlflow_timeout_s=TIMEOUT_S,
                         mlflow_shutdown_timeout_s=1.0)
    for i in range(10):  # ten runs queued behind a server that never answers
        response = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [float(i + 1)]})
        assert response.status_code == 200
    assert _wait_for_registry(client, "unreachable")["registry"]["state"] == "unreachable"
    started = time.monotonic()
    client.__exit__(None, None, None)
    assert time.monotonic() - started < 1.0 + 2 * TIMEOUT_S + 2  # the shutdown timeout, plus one call
