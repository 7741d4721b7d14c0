"""Headless Chromium for browser tests: Debian's ``chromium`` package driven by Playwright for Python.

Playwright's own browser download needs the network, so the system's binary is launched
(``executable_path``). Without it or without Playwright a browser test skips, naming what to install; under CI
(``CI=true``, set by .ci/run and CI services) it fails instead, so CI never drops a browser test silently.
``BDI_SCREENSHOT_DIR``: where a browser test also saves its screenshot (README's come from there).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")  # Debian's package, Ubuntu's older name
SCREENSHOT_DIR_ENV = "BDI_SCREENSHOT_DIR"


def chromium_or_skip() -> str:
    """The path of the system Chromium when it and Playwright are installed; else skip (fail under CI=true)."""
    chromium = next(filter(None, (shutil.which(name) for name in CHROMIUM_NAMES)), None)
    missing = []
    if chromium is None:
        missing.append("Chromium (Debian: apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python (pip install -e '.[test]', or pip install playwright)")
    if missing:
        reason = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI=true: .ci/run installs them", pytrace=False)
        pytest.skip(reason)
    assert chromium is not None
    return chromium


def save_screenshot(page: Any, *, dest_dir: Path, name: str) -> list[Path]:
    """Save the page's viewport as ``dest_dir/name`` and, when ``BDI_SCREENSHOT_DIR`` is set, there too."""
    dirs = [dest_dir]
    if os.environ.get(SCREENSHOT_DIR_ENV):
        dirs.append(Path(os.environ[SCREENSHOT_DIR_ENV]))
    written = []
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name))
        written.append(folder / name)
    return written
