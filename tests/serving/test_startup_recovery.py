"""What a start-up repairs after a crash (issue 16): orphaned temp files, runs left RUNNING."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .conftest import ClientFactory

REPO = Path(__file__).resolve().parents[2]


def _temp_file(directory: Path, *, age_s: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{uuid.uuid4().hex}.tmp"
    path.write_bytes(b"half a memory")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_startup_removes_orphaned_temp_files_older_than_the_age(
    client_factory: ClientFactory, models_dir: Path, tmp_path: Path
) -> None:
    model_dir = models_dir / "recipes" / "default" / "inspection-1"
    old = [_temp_file(model_dir, age_s=3600), _temp_file(models_dir / "recipes" / "default" / "datasets", age_s=601)]
    fresh = _temp_file(model_dir, age_s=5)  # may be another worker's write in progress
    others = [model_dir / "keep.tmp", model_dir / ".notes.tmp", model_dir / "a.npz"]
    for path in others:
        path.write_bytes(b"x")
        os.utime(path, (0, 0))
    client_factory(orphan_tmp_age_s=600)
    assert not any(p.exists() for p in old)
    assert fresh.exists() and all(p.exists() for p in others)
    events = [json.loads(line) for line in (tmp_path / "logs" / "backend_diagnostics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e["event"] == "startup.orphan_temp_files_removed"]
    assert event["count"] == 2


VICTIM = """
import sys, time
from pathlib import Path
from bdi.mlops.tracking import TrackingConfig, tracked_run
tracking = TrackingConfig(tracking_uri=sys.argv[1], experiment="bdi").resolve(Path(sys.argv[2]))
with tracked_run(tracking, run_name="victim") as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_run_left_running_by_a_sigkilled_process_is_marked_killed_at_the_next_start(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, uri, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                              text=True)
    try:
        assert victim.stdout is not None
        run_id = victim.stdout.readline().strip()
        assert run_id, "the victim never started its run"
    finally:
        victim.kill()  # SIGKILL: nothing can end the run
        victim.wait(timeout=30)
    mlflow = MlflowClient(tracking_uri=uri)
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    client = client_factory(mlflow_tracking_uri=uri)
    deadline = time.monotonic() + 30
    while mlflow.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mlflow.get_run(run_id).info.status == "KILLED"
    assert client.get("/health").json()["registry"]["state"] == "ok"
