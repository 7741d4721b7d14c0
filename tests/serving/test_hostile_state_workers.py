"""Issue 30 items 5-7 against a real ``uvicorn serving.app:app --workers 2`` (docs/design.md "Failed requests leave
nothing behind", "Deletes stay in their recipe", "Calibrations that detect nothing are flagged"): the state these
items are about lives on disk, so whichever worker served the failed request, the clear or the calibration, the
other worker sees the same result. tests/serving/test_hostile_state.py checks the details through TestClient."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

from .conftest import BASE, MM, ROI, ROLE, meta

pytestmark = pytest.mark.slow

TIMEOUT_S = 120.0
BOTH_WORKERS_S = 60.0  # how long to keep sending bursts until both workers have answered
BURST = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    tmp = tmp_path_factory.mktemp("hostile-state")
    with UvicornServer(cwd=tmp, env=server_env(tmp), workers=2, name="hostile-state") as started:
        yield started


@pytest.fixture(scope="module")
def recipes(server: UvicornServer) -> Path:
    return Path(server.env["BDI_MODELS_DIR"]) / "recipes"


def _client(server: UvicornServer, recipe: str | None = None) -> httpx.Client:
    """One connection per call (keep-alive off), so that calls are spread over both workers."""
    headers = {"Connection": "close", **({"X-Recipe-Id": recipe} if recipe else {})}
    return httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S, headers=headers,
                        limits=httpx.Limits(max_keepalive_connections=0))


def _served_by(server: UvicornServer, response: httpx.Response) -> int:
    """The pid of the worker that logged the ``http`` event of ``response``'s request id."""
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for event in server.events("http"):
            if event.get("request_id") == request_id:
                return int(event["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no http event logged for {request_id}")


def _from_both_workers(server: UvicornServer, call: Callable[[httpx.Client], httpx.Response],
                       recipe: str | None = None) -> dict[int, list[httpx.Response]]:
    """``call``'s responses by worker pid, in bursts of simultaneous connections until two workers have answered
    (one idle worker can win every accept of a sequential client)."""
    by_pid: dict[int, list[httpx.Response]] = {}
    deadline = time.monotonic() + BOTH_WORKERS_S

    def one(start: threading.Barrier) -> httpx.Response:
        with _client(server, recipe) as client:
            start.wait()
            return call(client)

    while len(by_pid) < 2:
        assert time.monotonic() < deadline, f"only workers {sorted(by_pid)} answered:\n{server.tail()}"
        start = threading.Barrier(BURST)
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            for response in pool.map(one, [start] * BURST):
                by_pid.setdefault(_served_by(server, response), []).append(response)
    return by_pid


def _infer(client: httpx.Client, *, mm_per_px: float = MM, roi_id: str = ROI) -> httpx.Response:
    return client.post("/infer", data={"role_id": ROLE, "roi_id": roi_id, "mm_per_px": str(mm_per_px)},
                       files={"image": ("crop.png", disc_png(seed=1), "image/png")})


def _fit(client: httpx.Client, *, mm_per_px: float = MM, roi_id: str = ROI, n: int = 10) -> httpx.Response:
    files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(n)]
    return client.post("/fit_ok", data={"role_id": ROLE, "roi_id": roi_id, "mm_per_px": str(mm_per_px)},
                       files=files)


def _upload(client: httpx.Client, label: str, seed: int) -> str:
    response = client.post(f"/datasets/{label}/upload", data={"role_id": ROLE, "roi_id": ROI, "metas": [meta()]},
                           files=[("images", (f"sample_{seed}.png", disc_png(seed=seed), "image/png"))])
    assert response.status_code == 200, response.text
    (saved,) = response.json()["saved"]
    return str(saved)


def _clear(client: httpx.Client) -> httpx.Response:
    return client.delete("/datasets/clear", params={"role_id": ROLE, "roi_id": ROI, "label": "ok"})


# ------------------------------------------------------------------------------------------- item 5


def test_failed_infer_on_both_workers_leaves_no_folder_and_no_scale_lock(server: UvicornServer,
                                                                         recipes: Path) -> None:
    answered = _from_both_workers(server, lambda client: _infer(client, mm_per_px=5.0), recipe="unused")
    for response in (r for responses in answered.values() for r in responses):
        assert response.status_code == 400 and "Memoria no encontrada" in response.text, response.text
    left_behind = (recipes / "unused").exists()
    with _client(server, "unused") as client:
        fit = _fit(client, mm_per_px=0.3, n=3)  # another scale than the failed requests': not locked to 5.0
    assert (left_behind, fit.status_code) == (False, 200), fit.text  # no folder, no lock (both seen on a break)
    assert json.loads((recipes / "unused" / "recipe_meta.json").read_text())["mm_per_px"] == 0.3


def test_infer_with_random_recipe_ids_creates_no_folders(server: UvicornServer, recipes: Path) -> None:
    before = set(recipes.iterdir()) if recipes.is_dir() else set()
    ids = [f"random-{uuid.uuid4().hex[:12]}" for _ in range(20)]

    def one(recipe: str) -> httpx.Response:
        with _client(server, recipe) as client:
            return _infer(client)

    with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent: both workers serve some
        responses = list(pool.map(one, ids))
    assert all(r.status_code == 400 and "Memoria no encontrada" in r.text for r in responses)
    after = set(recipes.iterdir()) if recipes.is_dir() else set()
    assert after == before, sorted(p.name for p in after - before)


# ------------------------------------------------------------------------------------------- item 6


def test_clear_that_would_reach_the_default_recipe_is_refused_and_an_own_clear_reports_it(
        server: UvicornServer, recipes: Path) -> None:
    ok_dir = recipes / "default" / "datasets" / BASE / "ok"
    with _client(server) as client:  # no X-Recipe-Id: the default recipe
        for seed in (1, 2):
            _upload(client, "ok", seed)
    assert len(list(ok_dir.iterdir())) == 4  # two images, each with its sidecar

    answered = _from_both_workers(server, _clear, recipe="zzz")
    for response in (r for responses in answered.values() for r in responses):
        assert response.status_code == 409 and set(response.json()) == {"detail"}, response.text
        assert "recipe 'default'" in response.json()["detail"]
    assert len(list(ok_dir.iterdir())) == 4
    assert not (recipes / "zzz").exists()

    with _client(server, "default") as client:
        body = _clear(client).json()
    assert body["cleared"] == 4 and body["resolved_recipe_id"] == "default", body  # images and sidecars
    assert not ok_dir.is_dir() or not list(ok_dir.iterdir())


def test_dataset_file_refuses_a_sidecars_name_for_get_and_delete(server: UvicornServer, recipes: Path) -> None:
    with _client(server, "sidecars") as client:
        saved = _upload(client, "ok", 7)
    sidecar = saved.rsplit(".", 1)[0] + ".json"
    params = {"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": sidecar}
    for method in ("GET", "DELETE"):
        answered = _from_both_workers(server, lambda client, m=method: client.request(m, "/datasets/file",
                                                                                    params=params),
                                      recipe="sidecars")
        for response in (r for responses in answered.values() for r in responses):
            assert response.status_code == 400 and set(response.json()) == {"detail"}, response.text
            assert "image" in response.json()["detail"]
    folder = recipes / "sidecars" / "datasets" / BASE / "ok"
    assert (folder / sidecar).is_file() and (folder / saved).is_file()


# ------------------------------------------------------------------------------------------- item 7


def _warned(response: httpx.Response) -> list[dict[str, object]]:
    assert response.status_code == 200, response.text
    return [a for a in response.json()["calibration_warnings"] if a["recipe_id"] == "warned"]


def test_calibration_above_every_ng_score_warns_and_both_workers_health_lists_it(server: UvicornServer) -> None:
    before = _from_both_workers(server, lambda client: client.get("/health"))  # both workers have read their alerts
    assert not any(_warned(r) for responses in before.values() for r in responses)
    with _client(server, "warned") as client:
        fit = _fit(client)
        assert fit.status_code == 200, fit.text
        response = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [1e30],
                                                      "ng_scores": [0.5, 0.7]})
    assert response.status_code == 200, response.text
    assert "no NG sample would be detected" in response.json()["warnings"][0]
    calibrated_by = _served_by(server, response)

    answered = _from_both_workers(server, lambda client: client.get("/health"))
    assert set(answered) == set(before) and calibrated_by in answered  # the other worker, which did not
    # calibrate and had answered /health before, lists it too
    for response in (r for responses in answered.values() for r in responses):
        alerts = _warned(response)
        assert len(alerts) == 1, response.json()["calibration_warnings"]
        assert alerts[0]["roi_id"] == ROI and alerts[0]["threshold"] >= 1e30
    assert server.events("calibration.detection_disabled")
