"""GET /metrics of a real ``uvicorn serving.app:app --workers 2`` (docs/metrics.md): counters add up over both
worker processes whichever worker answers the scrape, and a dead launch's folder is neither summed nor kept."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from tests.helpers.prometheus import sample_value
from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, ROI = "Inspection", "inspection-1"
HEALTH_200 = {"route": "/health", "method": "GET", "status": "200"}
STALE_COUNT = 1000.0  # what the dead launch's folder holds for /health 200
TIMEOUT_S = 60.0


def write_stale_launch(base: Path) -> Path:
    """A folder as a launch whose master (pid 999999, long gone) counted 1000 answered /health calls."""
    folder = base / "999999-1"
    folder.mkdir(parents=True)
    values = MmapedDict(str(folder / "counter_999999.db"))
    key = mmap_key("bdi_http_requests", "bdi_http_requests_total", list(HEALTH_200), list(HEALTH_200.values()),
                   "HTTP requests answered, by route template, method and status code.")
    values.write_value(key, STALE_COUNT, 0.0)
    values.close()
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    tmp = tmp_path_factory.mktemp("metrics-workers")
    write_stale_launch(tmp / "metrics")
    env = server_env(tmp, BDI_METRICS_DIR=str(tmp / "metrics"))
    with UvicornServer(cwd=tmp, env=env, workers=2) as started:
        yield started


def served_by(server: UvicornServer, request_id: str) -> int:
    """The pid of the worker that logged the ``http`` event of ``request_id``."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for event in server.events("http"):
            if event.get("request_id") == request_id:
                return int(event["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no http event logged for {request_id}")


def burst(server: UvicornServer, method: str, path: str, *, n: int = 8, **kwargs: object) -> list[httpx.Response]:
    """``n`` simultaneous requests on fresh connections (so that both workers accept some)."""
    start = threading.Barrier(n)

    def call(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S, headers={"Connection": "close"}) as client:
            start.wait()
            return client.request(method, path, headers={"X-Request-Id": str(uuid.uuid4())}, **kwargs)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(call, range(n)))


def scrape(server: UvicornServer) -> str:
    response = httpx.get(f"{server.base_url}/metrics", timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.text


def assert_health_counts_add_up(server: UvicornServer) -> None:
    """/health calls until both workers answered some; then every scrape, whichever worker answers it, counts
    exactly the calls sent."""
    before = sample_value(scrape(server), "bdi_http_requests_total", HEALTH_200)
    sent, pids = 0, set()
    deadline = time.monotonic() + 2 * TIMEOUT_S
    while len(pids) < 2 or sent < 16:
        assert time.monotonic() < deadline, f"only workers {pids} answered"
        for response in burst(server, "GET", "/health"):
            assert response.status_code == 200, response.text
            pids.add(served_by(server, response.headers["x-request-id"]))
            sent += 1
    # every scrape, whichever worker answers it, sums both workers' counts
    totals: set[float] = set()
    scrape_pids: set[int] = set()
    while len(scrape_pids) < 2:
        assert time.monotonic() < deadline, f"only workers {scrape_pids} answered /metrics"
        scrapes = burst(server, "GET", "/metrics")
        scrape_pids |= {served_by(server, r.headers["x-request-id"]) for r in scrapes}
        totals |= {sample_value(r.text, "bdi_http_requests_total", HEALTH_200) for r in scrapes}
    assert totals == {before + sent}, (totals, before, sent)


def test_request_counts_add_up_across_two_workers(server: UvicornServer) -> None:
    assert_health_counts_add_up(server)


def test_python_m_serving_launches_share_one_folder_too(tmp_path: Path) -> None:
    """The Dockerfile's command, ``python -m serving --workers 2``: its workers' folder is named after it."""
    env = server_env(tmp_path, BDI_METRICS_DIR=str(tmp_path / "metrics"))
    with UvicornServer(cwd=tmp_path, env=env, workers=2, launcher="serving") as started:
        assert_health_counts_add_up(started)
        assert [p.name.split("-")[0] for p in (tmp_path / "metrics").iterdir()] == [str(started.pid)]


def test_a_dead_launchs_folder_is_removed_and_not_summed(server: UvicornServer) -> None:
    base = Path(server.env["BDI_METRICS_DIR"])
    assert not (base / "999999-1").exists()
    assert [p.name.split("-")[0] for p in base.iterdir()] == [str(server.pid)]  # the uvicorn master's launch
    assert sample_value(scrape(server), "bdi_http_requests_total", HEALTH_200) < STALE_COUNT


def test_infers_on_both_workers_add_up_with_model_loads_and_cache_hits(server: UvicornServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as client:
        files = [("images", (f"ok{seed}.png", disc_png(seed=seed), "image/png")) for seed in range(10)]
        fit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"}, files=files)
        assert fit.status_code == 200, fit.text
        calibration = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "mm_per_px": 0.2,
                                                         "ok_scores": [0.1, 0.12, 0.11], "ng_scores": [0.9]})
        assert calibration.status_code == 200, calibration.text
    before = scrape(server)
    answers = burst(server, "POST", "/infer", n=4, data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
                    files={"image": ("crop.png", disc_png(seed=50), "image/png")})
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    after = scrape(server)
    model = {"recipe_id": "default", "role_id": ROLE, "roi_id": ROI}
    assert sample_value(after, "bdi_inspection_decisions_total", model) - \
        sample_value(before, "bdi_inspection_decisions_total", model) == 4
    assert sample_value(after, "bdi_infer_stage_duration_seconds_count", {"stage": "forward"}) - \
        sample_value(before, "bdi_infer_stage_duration_seconds_count", {"stage": "forward"}) == 4
    # concurrent first infers may each miss the cache and load: at most one load per infer
    assert 1 <= sample_value(after, "bdi_model_loads_total") - sample_value(before, "bdi_model_loads_total") <= 4
    # one at a time, a worker loads the model at most once more (if the burst missed it): 4 infers, ≥ 2 hits
    hit = {"cache": "model", "result": "hit"}
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as client:
        for _ in range(4):
            assert client.post("/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
                               files={"image": ("crop.png", disc_png(seed=50), "image/png")}).status_code == 200
    lookups = "bdi_model_cache_lookups_total"
    hits = sample_value(scrape(server), lookups, hit) - sample_value(after, lookups, hit)
    assert hits >= 2, hits
    assert json.loads(answers[0].text)["decision"] in ("ok", "ng")
