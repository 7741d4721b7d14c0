"""The architecture's import contracts (pyproject ``[tool.importlinter]``, docs/architecture.md) hold, and a
forbidden import breaks them: ``lint-imports`` is the checked rule, run here and in ``make test``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("src/bdi", "serving", "pipelines", "bench")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


def _copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_repository_keeps_every_import_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " broken" in result.stdout and "0 broken" in result.stdout


def test_patchcore_importing_mlflow_code_breaks_its_contract(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    knn = tree / "src/bdi/patchcore/knn.py"
    knn.write_text(knn.read_text(encoding="utf-8") + "\nfrom bdi.mlops import tracking  # noqa: E402,F401\n",
                   encoding="utf-8")
    result = _lint(tree)
    assert result.returncode != 0
    assert "patchcore imports only the root vocabulary BROKEN" in result.stdout
    assert "bdi.patchcore.knn -> bdi.mlops.tracking" in result.stdout


def test_serving_reaching_below_the_service_breaks_its_contract(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    app = tree / "serving/app.py"
    app.write_text(app.read_text(encoding="utf-8") + "\nfrom bdi.storage import store  # noqa: E402,F401\n",
                   encoding="utf-8")
    result = _lint(tree)
    assert result.returncode != 0
    assert "serving.app -> bdi.storage.store" in result.stdout
