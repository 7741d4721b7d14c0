"""GET /progress (additive, docs/contract.md): a real two-worker server reports how far a fit and a calibration
are while they run, done/total per stage, to a poller whose requests another worker answers (the progress is a
file beside the models, not one process's memory)."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env

from .conftest import MM, ROI, ROLE, upload
from .test_fit_lock_http import _clients_on_two_workers

pytestmark = pytest.mark.slow  # a real two-worker server

N_OK, N_NG = 40, 3
IDS = {"role_id": ROLE, "roi_id": ROI}


def _poll_while(job: threading.Thread, client: httpx.Client) -> list[dict[str, Any]]:
    """Every /progress answer while ``job`` runs, and one after it ended."""
    seen = []
    while job.is_alive():
        response = client.get("/progress", params=IDS)
        assert response.status_code == 200, response.text
        seen.append(response.json())
        time.sleep(0.01)
    seen.append(client.get("/progress", params=IDS).json())
    return seen


def _run(post: Any) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    out: dict[str, httpx.Response] = {}
    job = threading.Thread(target=lambda: out.setdefault("response", post()))
    job.start()
    return job, out


def test_progress_of_a_fit_and_a_calibration_is_reported_while_they_run_by_any_worker(tmp_path: Path) -> None:
    env = server_env(tmp_path / "server", BDI_BATCH_SIZE="1")  # one image per step: many steps to see
    with UvicornServer(cwd=tmp_path / "server", env=env, workers=2) as server, ExitStack() as stack:
        worker, poller = _clients_on_two_workers(server, stack)
        idle = poller.get("/progress", params=IDS).json()
        assert idle["state"] == "idle" and idle["job"] is None and idle["stages"] == {}
        upload(worker, "ok", seeds=range(N_OK))  # type: ignore[arg-type]  # an httpx client, like TestClient
        upload(worker, "ng", seeds=range(100, 100 + N_NG), defect="scratch")  # type: ignore[arg-type]

        job, out = _run(lambda: worker.post("/fit_ok", data={**IDS, "mm_per_px": str(MM), "use_dataset": "true"}))
        seen = _poll_while(job, poller)
        job.join()
        fit = out["response"]
        assert fit.status_code == 200, fit.text
        running = [s for s in seen if s["state"] == "running"]
        assert running, f"no running fit seen in {len(seen)} polls"
        assert all(s["job"] == "fit" and 0 <= s["done"] <= s["total"] for s in running)
        assert any(s["stage"] == "encode" and 0 < s["done"] < N_OK and s["total"] == N_OK for s in running), running
        last = seen[-1]
        coreset = fit.json()["coreset_size"]
        assert last["job"] == "fit" and last["state"] == "done" and last["error"] is None
        assert last["stages"] == {"encode": [N_OK, N_OK], "coreset": [coreset, coreset]}
        assert last["recipe_id"] == "default" and last["model_key"] == ROI

        job, out = _run(lambda: worker.post("/calibrate_dataset", json=IDS))
        seen = _poll_while(job, poller)
        job.join()
        assert out["response"].status_code == 200, out["response"].text
        assert any(s["job"] == "calibrate" and s["state"] == "running" for s in seen)
        assert seen[-1]["state"] == "done"
        assert seen[-1]["stages"] == {"score_ok": [N_OK, N_OK], "score_ng": [N_NG, N_NG]}

        refused = worker.post("/fit_ok", data={**IDS, "mm_per_px": "0.5", "use_dataset": "true"})
        assert refused.status_code == 409  # another scale is locked: refused before any work,
        assert poller.get("/progress", params=IDS).json()["job"] == "calibrate"  # so the last job's progress stays
