"""Crashes (issue 16): a real uvicorn server SIGKILLed inside the save stage of a /fit_ok.

The save stage writes each file to a temporary file, then renames it over the old one; it lasts
milliseconds, so the server runs with a test-only ``sitecustomize`` that, once the test creates a flag
file, pauses after each temporary file is written (before the rename). The test polls the model folder
until a temporary file appears and kills the server there. After a restart the previous model still
loads and /infer answers with its threshold; no partial or temporary file is left, and the next fit is
not blocked by the dead fit's lock.
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
    """The model folder's files but its lock files (empty flock targets) and temporary files."""
    folder = models_dir / "recipes" / "default" / ROI
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.endswith(("lock", ".tmp"))}


PAUSE_HOOK = """\
import os, time
from pathlib import Path

import bdi.storage.fsio as fsio

_flag = Path(os.environ["TEST_PAUSE_SAVES_FLAG"])
_write_temp_file = fsio.write_temp_file


def write_temp_file(directory, data):
    tmp = _write_temp_file(directory, data)
    # only the model's own files: the fit's progress and audit files are written elsewhere, earlier
    if _flag.exists() and "recipes" in Path(directory).parts:
        time.sleep(120)  # the test kills the server in here, between the temp file and its rename
    return tmp


fsio.write_temp_file = write_temp_file
"""


def _pausing_env(tmp_path: Path, models_dir: Path) -> tuple[dict[str, str], Path]:
    hook = tmp_path / "pause-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK, encoding="utf-8")
    flag = tmp_path / "pause-saves"
    env = server_env(tmp_path, models_dir, TEST_PAUSE_SAVES_FLAG=str(flag))
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    return env, flag


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_sigkill_inside_the_save_stage_leaves_the_previous_model_serving(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    folder = models_dir / "recipes" / "default" / ROI
    probe = disc_png(seed=500)
    env, pause_flag = _pausing_env(tmp_path, models_dir)
    first = UvicornServer(cwd=tmp_path, env=env, name="first").start()
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

            rid = f"next-fit-{uuid.uuid4().hex[:8]}"
            refit = [("images", (f"n_{i}.png", disc_png(seed=1000 + i), "image/png")) for i in range(12)]
            outcome: dict[str, Any] = {}

            def next_fit() -> None:
                try:
                    outcome["response"] = client.post(
                        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}, files=refit,
                        headers={"X-Request-Id": rid})
                except httpx.TransportError as exc:  # the server died under it
                    outcome["error"] = exc

            assert _temp_files(folder) == []
            pause_flag.touch()  # from now on each save pauses between its temp file and the rename
            thread = threading.Thread(target=next_fit)
            thread.start()
            deadline = time.monotonic() + 120
            while not _temp_files(folder):  # the save stage has begun: the new file is written, not renamed
                assert time.monotonic() < deadline and thread.is_alive(), f"no save began: {outcome}"
                time.sleep(0.01)
            os.killpg(first.pid, signal.SIGKILL)
            first.proc.wait(timeout=30)
            thread.join(timeout=60)
        assert "error" in outcome, outcome  # it never answered: killed in its save stage
    finally:
        first.stop()
    assert _temp_files(folder), "the kill left no temp file: it did not land inside the save stage"
    pause_flag.unlink()

    assert _model_files(models_dir) == saved  # nothing new, nothing torn: the old files, byte for byte
    env["BDI_ORPHAN_TMP_AGE_S"] = "0"  # restart: clear the dead save's temp file now
    with UvicornServer(cwd=tmp_path, env=env, name="second") as second:
        with httpx.Client(base_url=second.base_url, timeout=120) as client:
            after = _infer(client, probe)
            assert after.status_code == 200, after.text
            assert after.json()["threshold"] == 10.0 and after.json()["score"] == pytest.approx(before["score"])
            assert list(models_dir.rglob("*.tmp")) == []  # the dead save's temp file is gone
            assert _model_files(models_dir) == saved  # and no partial artefact appeared
            files = [("images", (f"r_{i}.png", disc_png(seed=2000 + i), "image/png")) for i in range(4)]
            refit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                                files=files)
            assert refit.status_code == 200, refit.text  # the dead fit's lock is gone with its process
