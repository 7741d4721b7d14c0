"""Issue 30 item 4: one answer per image whichever worker serves it. ``BDI_RUNTIME=auto`` is chosen once per
export (``runtime_choice.json``) and every worker, including one the uvicorn parent respawns after a SIGKILL,
runs the recorded runtime."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, ROI, MM = "Inspection", "inspection-1", 0.2
RESPAWN_TIMEOUT_S = 180.0


def _workers(parent: int) -> set[int]:
    """The uvicorn parent's worker processes (multiprocessing spawn children, not its resource tracker)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return set()
    out = set()
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            out.add(pid)
    return out


def test_after_a_worker_is_killed_every_answer_for_one_image_has_one_score(tmp_path: Path) -> None:
    env = server_env(tmp_path, BDI_RUNTIME="auto", BDI_WORKERS="2")
    with UvicornServer(cwd=tmp_path, env=env, workers=2, name="two-workers") as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as client:
        files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(10)]
        fit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}, files=files)
        assert fit.status_code == 200, fit.text
        assert client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [10.0]}
                           ).status_code == 200
        deadline = time.monotonic() + RESPAWN_TIMEOUT_S
        while len(_workers(server.pid)) < 2 or len(server.events("runtime.selected")) < 2:
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.5)
        before = _workers(server.pid)
        os.kill(min(before), signal.SIGKILL)
        while len(server.events("runtime.selected")) < 3:  # the respawned worker has chosen its runtime
            assert time.monotonic() < deadline, f"no worker was respawned:\n{server.tail()}"
            time.sleep(0.5)
        assert len(_workers(server.pid) - before) == 1

        probe = disc_png(seed=500)
        scores = set()
        for _ in range(30):
            response = client.post("/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                                   files={"image": ("crop.png", probe, "image/png")})
            assert response.status_code == 200, response.text
            scores.add(response.json()["score"])
        assert len(scores) == 1, scores

        selected = server.events("runtime.selected")
        assert len({event["active"] for event in selected}) == 1, [event["reason"] for event in selected]
        assert selected[-1]["choice"]["source"] == "recorded"  # the respawned worker timed nothing
        health = {client.get("/health").json()["runtime_choice"]["runtime"] for _ in range(10)}
        assert health == {selected[0]["active"]}
