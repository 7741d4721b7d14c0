"""End to end: a real ``uvicorn serving.app:app --workers 2`` on loopback, driven like the GUI.

Two worker processes each build their own service; a fit written by one must be used by the other
(the store's caches are keyed by file identity, disk is the truth).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, ROI = "Inspection", "inspection-1"
MM = 0.2
ANNULUS = {"kind": "annulus", "cx": 48, "cy": 48, "r": 44, "r_inner": 12}
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    tmp = tmp_path_factory.mktemp("e2e")
    env = server_env(tmp)
    env.pop("OMP_NUM_THREADS")  # torch picks its thread count, as a plant's two workers would
    with UvicornServer(cwd=tmp, env=env, workers=2) as started:
        yield started


def gui_client(server: UvicornServer, *, recipe: str = "DefaultLayout") -> httpx.Client:
    """Like BackendClient: a new X-Request-Id per call and the layout name as X-Recipe-Id.

    Keep-alive is off so successive calls are spread over both worker processes.
    """

    def add_ids(request: httpx.Request) -> None:
        request.headers["X-Request-Id"] = str(uuid.uuid4())
        request.headers["X-Recipe-Id"] = recipe

    return httpx.Client(
        base_url=server.base_url,
        timeout=REQUEST_TIMEOUT_S,
        headers={"Connection": "close"},
        limits=httpx.Limits(max_keepalive_connections=0),
        event_hooks={"request": [add_ids]},
    )


def served_by(server: UvicornServer, request_id: str) -> int:
    """The pid of the worker that logged the ``http`` event of ``request_id``."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if server.log_file.is_file():
            for line in server.log_file.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "http" and event.get("request_id") == request_id:
                    return int(event["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no http event logged for {request_id}")


def get_from_another_worker(server: UvicornServer, path: str, params: dict[str, str], avoid_pid: int) -> Any:
    """The JSON body of ``GET path`` as answered by a worker other than ``avoid_pid``.

    The kernel decides which worker accepts a connection, and one idle worker can win every accept of
    a sequential client. Bursts of simultaneous connections make both workers accept.
    """
    burst = 8

    def call(start: threading.Barrier) -> httpx.Response:
        with gui_client(server) as client:
            start.wait()
            return client.get(path, params=params)

    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while time.monotonic() < deadline:
        start = threading.Barrier(burst)
        with ThreadPoolExecutor(max_workers=burst) as pool:
            responses = list(pool.map(call, [start] * burst))
        for response in responses:
            assert response.status_code == 200, response.text
            if served_by(server, response.headers["x-request-id"]) != avoid_pid:
                return response.json()
    raise AssertionError(f"no request reached a worker other than {avoid_pid} in {REQUEST_TIMEOUT_S:.0f} s")


def gui_meta(filename: str) -> str:
    return json.dumps({
        "role_id": ROLE, "roi_id": ROI, "label": None, "filename": filename, "angle": None,
        "timestamp": None, "mm_per_px": MM, "shape_json": json.dumps(ANNULUS),
        "created_at_utc": "2026-01-01T00:00:00Z", "source_path": None,
    })


def upload_sample(client: httpx.Client, label: str, image: bytes, name: str) -> str:
    # The GUI sends metas as an application/json part without a file name.
    files: list[tuple[str, Any]] = [
        ("images", (name, image, "image/png")),
        ("metas", (None, gui_meta(name), "application/json")),
    ]
    response = client.post(f"/datasets/{label}/upload", data={"role_id": ROLE, "roi_id": ROI}, files=files)
    assert response.status_code == 200, response.text
    (saved,) = response.json()["saved"]
    return str(saved)


def assert_gui_infer_types(body: dict[str, Any]) -> None:
    assert isinstance(body["score"], float)
    assert isinstance(body["threshold"], float)
    assert body["decision"] in ("ok", "ng")
    assert isinstance(body["regions"], list)
    for region in body["regions"]:
        for key in ("x", "y", "w", "h", "area_px", "area_mm2"):
            assert isinstance(region[key], float)
        assert len(region["bbox"]) == 4
    if body["heatmap_png_base64"] is not None:
        base64.b64decode(body["heatmap_png_base64"], validate=True)


def test_gui_workflow_across_two_workers(server: UvicornServer) -> None:
    ok_images = {f"sample_ok_{i}.png": disc_png(seed=i) for i in range(10)}
    ng_images = {f"sample_ng_{i}.png": disc_png(seed=100 + i, defect="scratch") for i in range(2)}
    ids = {"role_id": ROLE, "roi_id": ROI}
    with gui_client(server) as client:
        saved_ok = {upload_sample(client, "ok", data, name): data for name, data in ok_images.items()}
        saved_ng = {upload_sample(client, "ng", data, name): data for name, data in ng_images.items()}

        state = client.get("/state", params={**ids, "model_key": ROI})
        assert state.status_code == 200
        assert state.json()["memory_fitted"] is False and state.json()["recipe_id"] == "defaultlayout"

        fit = client.post("/fit_ok", data={**ids, "mm_per_px": str(MM), "memory_fit": "false",
                                           "model_key": ROI, "use_dataset": "true"})
        assert fit.status_code == 200, fit.text
        assert fit.json()["n_embeddings"] == 10 * 64 and fit.json()["token_shape"] == [8, 8]
        fit_pid = served_by(server, fit.headers["x-request-id"])

        # The other worker must see the new memory on disk.
        other_worker_state = get_from_another_worker(server, "/state", {**ids, "model_key": ROI}, fit_pid)
        assert other_worker_state["memory_fitted"] is True

        calib = client.post("/calibrate_dataset", json={**ids, "default_mm_per_px": MM})
        assert calib.status_code == 200, calib.text
        calib_body = calib.json()
        assert isinstance(calib_body["threshold"], float) and calib_body["threshold"] > 0
        assert calib_body["n_ok"] == 10 and calib_body["n_ng"] == 2

        shape = json.dumps(ANNULUS)
        for image in (disc_png(seed=3), disc_png(seed=200, defect="pit"), disc_png(seed=201, defect="crack")):
            for _ in range(2):  # twice, so both workers are likely to score with the shared model
                response = client.post("/infer", data={**ids, "mm_per_px": str(MM), "shape": shape,
                                                       "model_key": ROI},
                                       files={"image": ("roi.png", image, "image/png")})
                assert response.status_code == 200, response.text
                assert_gui_infer_types(response.json())

        listing = client.get("/datasets/list", params=ids)
        assert listing.status_code == 200
        classes = listing.json()["classes"]
        assert classes["ok"]["files"] == sorted(saved_ok) and classes["ng"]["count"] == 2
        assert all(classes["ok"]["meta"].values())

        name, data = next(iter(saved_ok.items()))
        meta = client.get("/datasets/meta", params={**ids, "label": "ok", "filename": name})
        assert meta.status_code == 200
        assert meta.json()["filename"] == name and meta.json()["mm_per_px"] == MM
        assert json.loads(meta.json()["shape_json"]) == ANNULUS

        download = client.get("/datasets/file", params={**ids, "label": "ok", "filename": name})
        assert download.status_code == 200 and download.content == data
        assert download.headers["content-type"] == "image/png"

        # The GUI deletes by the meta's filename, which is the stored name.
        deleted = client.delete("/datasets/file", params={**ids, "label": "ok",
                                                          "filename": meta.json()["filename"]})
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        ng_name = next(iter(saved_ng))
        assert client.get("/datasets/file", params={**ids, "label": "ok", "filename": name}).status_code == 404

        manifest = client.get("/manifest", params={**ids, "model_key": ROI})
        assert manifest.status_code == 200
        body = manifest.json()
        assert body["memory"] is True and body["calib"]["threshold"] == calib_body["threshold"]
        assert body["datasets"]["classes"]["ok"]["count"] == 9
        assert ng_name in body["datasets"]["classes"]["ng"]["files"]


def test_health_answers_while_a_fit_is_running(server: UvicornServer) -> None:
    images = [("images", (f"{i}.png", disc_png(seed=300 + i), "image/png")) for i in range(200)]
    outcome: dict[str, Any] = {}

    def run_fit() -> None:
        with gui_client(server, recipe="load") as client:
            outcome["fit"] = client.post("/fit_ok", data={"role_id": "Load", "roi_id": "load-1",
                                                          "mm_per_px": "0.3"}, files=images)

    fit_thread = threading.Thread(target=run_fit, daemon=True)
    fit_thread.start()
    latencies_during_fit: list[float] = []
    with gui_client(server, recipe="load") as client:
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while fit_thread.is_alive() and time.monotonic() < deadline:
            started = time.monotonic()
            response = client.get("/health", timeout=2.0)
            elapsed = time.monotonic() - started
            assert response.status_code == 200 and elapsed < 2.0
            if fit_thread.is_alive():
                latencies_during_fit.append(elapsed)
            time.sleep(0.05)
    fit_thread.join(timeout=REQUEST_TIMEOUT_S)
    assert not fit_thread.is_alive()
    assert outcome["fit"].status_code == 200, outcome["fit"].text
    assert latencies_during_fit, "the fit finished before any /health call overlapped it"
