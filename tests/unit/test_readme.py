"""README's library example runs as written (from a checkout with ../shared beside it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def _python_block(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {title}'"
    return match.group(1)


@pytest.mark.skipif(not (SHARED / "data" / "magnetic_tile").is_dir(), reason="needs ../shared/data")
def test_readme_library_example_fits_and_infers(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BDI_", "BRAKEDISC_"))}
    env["BDI_WEIGHTS_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-c", _python_block("Using the library")],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "n_embeddings=32000" in lines[0] and "token_shape=(40, 40)" in lines[0]  # 320 px / stride 8
    assert float(lines[1]) > 0  # the calibrated threshold
    threshold = float(lines[1])
    decision, score = lines[-1].split()
    assert decision == "ng", f"the crack image scored {score} against threshold {threshold} and was passed"
    assert float(score) > threshold
    assert (checkout / "models" / "recipes" / "default").is_dir()
