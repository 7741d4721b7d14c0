"""A new user's retraining: ``dvc repro`` on a fresh clone, offline, with no ``../shared`` and nothing set.

The clone is this checkout's files as git would commit them (tracked and untracked-not-ignored, so the test
sees work in progress), committed in a new repository under a temporary folder whose parent has no ``shared``.
Nothing of conf/ is changed: the default dataset (``auto``: no server samples here, so seeded synthetic discs
that the ingest stage generates) and the default pretrained model (efficientnet_lite2, weights from pip). HOME
is a fresh folder, so no cache of this machine helps. Then: a second ``dvc repro`` reruns only ingest, and the
real dataset without its folder fails with a message naming the folder and the overrides.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bdi.backbones import PRETRAINED_CNN

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STAGES = {"ingest", "fit_ok", "calibrate", "evaluate", "register"}
TIMEOUT_S = 600


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "BDI_", "BRAKEDISC_", "MLFLOW_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home), PYTHONDONTWRITEBYTECODE="1",
               GIT_AUTHOR_NAME="bdi-test", GIT_AUTHOR_EMAIL="bdi-test@example.invalid",
               GIT_COMMITTER_NAME="bdi-test", GIT_COMMITTER_EMAIL="bdi-test@example.invalid")
    env.pop("XDG_CACHE_HOME", None)
    return env


def _run(root: Path, env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if ok:
        assert out.returncode == 0, f"{args} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), node)]


def _clone(dest: Path) -> None:
    """The checkout's files as a commit would hold them, in a new git repository at ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = PROJECT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_dvc_repro_on_a_fresh_clone_trains_and_registers_on_the_default_dataset(tmp_path: Path) -> None:
    root, home = tmp_path / "bdi", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    env = _env(home)
    _clone(root)
    assert not (root.parent / "shared").exists() and not (root / "models").exists()
    _run(root, env, "git", "init", "-q")
    _run(root, env, "git", "add", "-A")
    _run(root, env, "git", "commit", "-q", "-m", "fresh clone")
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    assert params["dataset"]["kind"] == "auto" and params["model"]["features"]["backbone"] == PRETRAINED_CNN

    start = time.monotonic()
    first = _run(root, env, str(VENV_BIN / "dvc"), "repro")
    elapsed = time.monotonic() - start
    assert _ran(first.stdout) == STAGES, first.stdout
    sys.stderr.write(f"fresh-clone dvc repro: {elapsed:.0f} s\n")

    report = json.loads((root / params["paths"]["ingest_report"]).read_text(encoding="utf-8"))
    dataset = report["dataset"]
    assert dataset["used"] == "synthetic" and dataset["folder"] == "data/synthetic"
    assert dataset["generator"]["generator"] == "bdi.data.synthetic.write_mvtec_dataset"
    assert dataset["generator"]["seed"] == params["dataset"]["synthetic"]["seed"]
    assert report["n_rejected"] == 0 and report["n_kept"] == 16 + 8 + 3 * 4

    metrics = json.loads((root / params["paths"]["metrics"]).read_text(encoding="utf-8"))
    aurocs = [v for k, v in _leaves(metrics) if k.endswith("image_auroc") and "per_class" not in k]
    assert aurocs and min(aurocs) >= 0.9, metrics  # pretrained features find the painted defects

    from mlflow import MlflowClient

    record = json.loads((root / params["paths"]["registration"]).read_text(encoding="utf-8"))["models"][0]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(record["name"],
                                                                                 str(record["version"]))
    assert int(version.version) == record["version"] == 1
    assert version.tags["data_source"] == "data/synthetic"  # what ingest read, not dataset.source (models)

    again = _run(root, env, str(VENV_BIN / "dvc"), "repro")  # the same discs, reused: nothing after ingest runs
    assert _ran(again.stdout) == {"ingest"}, again.stdout
    assert "synthetic discs generated earlier with these settings: reused" in json.loads(
        (root / params["paths"]["ingest_report"]).read_text(encoding="utf-8"))["dataset"]["note"]

    failed = _run(root, env, str(VENV_BIN / "dvc"), "exp", "run", "-S", "dataset=magnetic_tile", ok=False)
    assert failed.returncode != 0
    text = failed.stdout + failed.stderr
    assert "error: ingest: dataset.source: folder '../shared/data/magnetic_tile' does not exist" in text, text
    assert "dvc exp run -S dataset.source=/path/to/folder" in text and "-S dataset=synthetic" in text
    assert "Traceback" not in text
