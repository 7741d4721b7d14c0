"""A /fit_ok of a model whose fit lock is held elsewhere is a 409 that says so (issue 16), and two workers of a
real server fitting one ROI at once take turns (issue 31).

The two-process behaviour of the library is tested in ``tests/unit/test_fit_lock.py``; the first test here holds
the lock itself and the request comes through the app.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore
from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

from .conftest import MM, ROI, ROLE, ClientFactory, fit_from_dataset, upload


def test_fit_of_a_model_being_fitted_is_409_shape_a_after_the_bounded_wait(client_factory: ClientFactory) -> None:
    client = client_factory(fit_lock_timeout_s=0.2)
    upload(client, "ok", seeds=range(10))
    service: InspectionService = client.app.state.service  # type: ignore[attr-defined]
    ref = ModelRef.create(recipe_id="default", role_id=ROLE, roi_id=ROI, model_key=None)
    with ModelStore(service.settings.models_dir).fit_lock(ref, timeout_s=0):
        response = fit_from_dataset(client)
        other = fit_from_dataset(client, model_key="another-key")
    assert response.status_code == 409
    body = response.json()
    assert set(body) == {"error", "request_id", "recipe_id"}
    assert "another fit of model_key 'inspection-1'" in body["error"] and "retry" in body["error"]
    assert other.status_code == 200  # only the same model is serialised
    assert fit_from_dataset(client, mm_per_px=MM).status_code == 200  # released: fits again


def _clients_on_two_workers(server: UvicornServer, stack: ExitStack) -> list[httpx.Client]:
    """Two keep-alive clients whose connections two different worker processes accepted (found by probing)."""
    by_pid: dict[int, httpx.Client] = {}
    for n in range(40):
        client = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=180))
        rid = f"probe-{n}"
        assert client.get("/health", headers={"X-Request-Id": rid}).status_code == 200
        deadline = time.monotonic() + 10
        while not (seen := [e for e in server.events("http") if e.get("request_id") == rid]):
            assert time.monotonic() < deadline, f"no log line for {rid}"
            time.sleep(0.02)
        by_pid.setdefault(int(seen[0]["pid"]), client)
        if len(by_pid) == 2:
            return list(by_pid.values())
    raise AssertionError("40 connections in a row went to one worker")


@pytest.mark.slow
def test_two_uvicorn_workers_fitting_one_roi_at_once_one_gets_409(tmp_path: Path) -> None:
    """Two /fit_ok of one ROI sent together to two worker processes of a real server: the fits (1 s or more
    each) would overlap, so the second to reach the fit lock waits its 0.2 s and gets the 409."""
    env = server_env(tmp_path, BDI_FIT_LOCK_TIMEOUT_S="0.2")
    files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(32)]
    data = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}
    go = threading.Barrier(2)  # both requests leave together
    with UvicornServer(cwd=tmp_path, env=env, workers=2) as server, ExitStack() as stack:
        clients = _clients_on_two_workers(server, stack)

        def fit(n: int) -> httpx.Response:
            go.wait(30)
            return clients[n].post("/fit_ok", data=data, files=files, headers={"X-Request-Id": f"race-{n}"})

        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(fit, range(2)))
        by_status = {r.status_code: r for r in responses}
        assert sorted(by_status) == [200, 409], f"both fits ran at once: {[r.text[:200] for r in responses]}"
        assert "another fit of model_key 'inspection-1'" in by_status[409].json()["error"]
