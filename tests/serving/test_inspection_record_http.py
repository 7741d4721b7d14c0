"""The inspection record over real servers (issue 27): two uvicorn workers answer a stream of /infer requests from
several threads and are SIGKILLed mid-stream; every answered request is in the record, parseable, with its own
request id and decision. A restarted server reads the dead workers' segments (and a torn line written by hand)
through GET /inspections, filtered and paged."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, MM = "Inspection", 0.2
ROIS = ("roi-a", "roi-b")


def _infer(client: httpx.Client, roi: str, image: bytes) -> httpx.Response:
    return client.post("/infer", data={"role_id": ROLE, "roi_id": roi, "mm_per_px": str(MM)},
                       files={"image": ("crop.png", image, "image/png")})


def _segment_lines(models_dir: Path) -> list[str]:
    return [line for path in sorted((models_dir / "_inspections").glob("seg-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def _pids_that_recorded(models_dir: Path, request_ids: set[str]) -> set[int]:
    pids = set()
    for line in _segment_lines(models_dir):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if record["request_id"] in request_ids:
            pids.add(record["pid"])
    return pids


def test_every_answered_infer_survives_sigkill_and_reads_back_filtered_and_paged(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    env = server_env(tmp_path, models_dir)
    answered: dict[str, dict[str, Any]] = {}  # request_id -> body, for every request that got its answer
    images = [disc_png(seed=100 + i) for i in range(8)] + [disc_png(seed=200, defect="scratch")]
    stop = threading.Event()
    server = UvicornServer(cwd=tmp_path, env=env, workers=2, name="first").start()
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            for roi in ROIS:
                files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(10)]
                fit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": roi, "mm_per_px": str(MM)}, files=files)
                assert fit.status_code == 200, fit.text
                calib = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": roi, "ok_scores": [1e9]})
                assert calib.status_code == 200, calib.text
                # a threshold at the median score of the stream's images, so both decisions are recorded
                scores = sorted(_infer(client, roi, image).json()["score"] for image in images)
                median = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
                calib = client.post("/calibrate_manual", json={"role_id": ROLE, "roi_id": roi, "threshold": median})
                assert calib.status_code == 200, calib.text

        def stream(worker: int) -> None:
            # a new connection per request: a kept-alive one stays on the worker that accepted it, and the kernel
            # may hand all three to the same worker
            fresh = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=server.base_url, timeout=60, limits=fresh) as client:
                i = 0
                while not stop.is_set():
                    roi = ROIS[(worker + i) % 2]
                    try:
                        response = _infer(client, roi, images[i % len(images)])
                    except httpx.TransportError:
                        return  # the server died under this request: it was never answered
                    if response.status_code == 200:
                        answered[response.json()["request_id"]] = {**response.json(), "roi_id": roi}
                    i += 1

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 180
        # until both workers have answered and recorded part of the stream (dict.copy is atomic under the GIL)
        while len(answered) < 25 or len(_pids_that_recorded(models_dir, set(answered.copy()))) < 2:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)  # mid-stream: requests are in flight on both workers
        assert server.proc is not None
        server.proc.wait(timeout=30)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        stop.set()
        server.stop()
    assert len(answered) >= 25

    lines = _segment_lines(models_dir)
    records = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # only a request cut by the kill may leave a partial line
        records[record["request_id"]] = record
    missing = sorted(set(answered) - set(records))
    assert not missing, f"answered but not recorded: {missing[:5]}"
    pids = {records[rid]["pid"] for rid in answered}
    assert len(pids) == 2, "both workers answered and recorded"
    for rid, body in answered.items():
        record = records[rid]
        assert record["decision"] == body["decision"] and record["score"] == pytest.approx(body["score"])
        assert record["threshold"] == body["threshold"] and record["memory_fingerprint"]
        assert len(record["image_sha256"]) == 64 and record["sharpness"] > 0 and record["timings_ms"]
    assert {records[rid]["decision"] for rid in answered} == {"ok", "ng"}

    segment = sorted((models_dir / "_inspections").glob("seg-*.jsonl"))[0]
    with segment.open("ab") as handle:
        handle.write(b'{"id": "torn", "ts": "2030-01-01T00:00:00')  # a torn last line, as a machine crash leaves

    with UvicornServer(cwd=tmp_path, env=env, workers=1, name="second") as second:
        with httpx.Client(base_url=second.base_url, timeout=120) as client:
            seen: list[dict[str, Any]] = []
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"roi_id": "roi-b", "limit": 7, **({"cursor": cursor} if cursor else {})}
                page = client.get("/inspections", params=params)
                assert page.status_code == 200, page.text
                seen += page.json()["items"]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
            expected_b = {rid for rid, body in answered.items() if body.get("roi_id") == "roi-b"}
            assert {item["request_id"] for item in seen} >= expected_b
            assert all(item["roi_id"] == "roi-b" for item in seen)
            assert [item["ts"] for item in seen] == sorted((item["ts"] for item in seen), reverse=True)
            assert len({item["id"] for item in seen}) == len(seen)  # pages neither repeat nor skip

            ng = client.get("/inspections", params={"decision": "ng", "roi_id": "roi-a", "limit": 1000}).json()
            expected_ng = {rid for rid, body in answered.items()
                           if body.get("roi_id") == "roi-a" and body["decision"] == "ng"}
            assert expected_ng and {item["request_id"] for item in ng["items"]} >= expected_ng
            assert all(item["decision"] == "ng" and item["roi_id"] == "roi-a" for item in ng["items"])
            later = client.get("/inspections", params={"since": "2100-01-01"}).json()
            assert later["count"] == 0
            assert client.get("/inspections", params={"decision": "maybe"}).status_code == 400
