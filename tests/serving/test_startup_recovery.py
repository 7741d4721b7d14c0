"""What a start-up repairs after a crash (issue 16): orphaned temp files, runs left RUNNING."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from .conftest import ClientFactory


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
