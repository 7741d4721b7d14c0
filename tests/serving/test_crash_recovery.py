"""Crashes (issue 16): a real uvicorn server SIGKILLed in the middle of a large /fit_ok.

After a restart the previous model still loads and /infer answers with its threshold; no partial or
temporary file is left, and the next fit is not blocked by the dead fit's lock.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, ROI, MM = "Inspection", "inspection-1", 0.2


def _infer(client: httpx.Client, image: bytes) -> httpx.Response:
    return client.post("/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                       files={"image": ("crop.png", image, "image/png")})


def _model_files(models_dir: Path) -> dict[str, bytes]:
    """The model folder's files but its lock files (empty flock targets)."""
    folder = models_dir / "recipes" / "default" / ROI
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.endswith("lock")}


def test_sigkill_mid_fit_leaves_the_previous_model_serving(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    probe = disc_png(seed=500)
    first = UvicornServer(cwd=tmp_path, env=server_env(tmp_path, models_dir), name="first").start()
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.base_url, timeout=120) as client:
            files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(10)]
            assert client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                               files=files).status_code == 200
            assert client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI,
                                                      "ok_scores": [10.0]}).status_code == 200
            before = _infer(client, probe).json()
            assert before["threshold"] == 10.0
            saved = _model_files(models_dir)

            rid = f"big-fit-{uuid.uuid4().hex[:8]}"
            big = [("images", (f"n_{i}.png", disc_png(seed=1000 + i), "image/png")) for i in range(200)]
            outcome: dict[str, Any] = {}

            def big_fit() -> None:
                try:
                    outcome["response"] = client.post(
                        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}, files=big,
                        headers={"X-Request-Id": rid})
                except httpx.TransportError as exc:  # the server died under it
                    outcome["error"] = exc

            thread = threading.Thread(target=big_fit)
            thread.start()
            deadline = time.monotonic() + 60
            while not [e for e in first.events("fit_ok.request") if e.get("request_id") == rid]:
                assert time.monotonic() < deadline, "the big fit never started"
                time.sleep(0.05)
            time.sleep(0.5)  # into the encode loop (200 images take far longer)
            os.killpg(first.pid, signal.SIGKILL)
            first.proc.wait(timeout=30)
            thread.join(timeout=60)
        assert "error" in outcome, outcome  # it never answered: killed mid-fit
    finally:
        first.stop()

    assert _model_files(models_dir) == saved  # nothing new, nothing torn: the old files, byte for byte
    env = server_env(tmp_path, models_dir, BDI_ORPHAN_TMP_AGE_S="0")  # restart: clear any temp file now
    with UvicornServer(cwd=tmp_path, env=env, name="second") as second:
        with httpx.Client(base_url=second.base_url, timeout=120) as client:
            after = _infer(client, probe)
            assert after.status_code == 200, after.text
            assert after.json()["threshold"] == 10.0 and after.json()["score"] == pytest.approx(before["score"])
            assert list(models_dir.rglob("*.tmp")) == []  # no temp file is left
            assert _model_files(models_dir) == saved  # and no partial artefact appeared
            files = [("images", (f"r_{i}.png", disc_png(seed=2000 + i), "image/png")) for i in range(4)]
            refit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                                files=files)
            assert refit.status_code == 200, refit.text  # the dead fit's lock is gone with its process
