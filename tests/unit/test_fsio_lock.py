"""`bdi.storage.fsio.exclusive_lock`, the one inter-process lock behind the fit, export and recipe-scale locks."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from bdi.errors import ExportError, StorageError
from bdi.storage.fsio import exclusive_lock


def _lock(path: Path, timeout_s: float = 0.1) -> AbstractContextManager[None]:
    return exclusive_lock(path, timeout_s=timeout_s, busy=lambda: ExportError("busy"),
                          unusable=lambda exc: StorageError(f"unusable: {exc}"))


def test_a_held_lock_makes_the_second_holder_fail_with_the_busy_error(tmp_path: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with _lock(tmp_path / "sub" / ".x.lock"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    try:
        with pytest.raises(ExportError, match="busy"), _lock(tmp_path / "sub" / ".x.lock"):
            pass
    finally:
        release.set()
        thread.join()
    with _lock(tmp_path / "sub" / ".x.lock"):  # released: free again
        pass


def test_a_lock_whose_folder_cannot_exist_is_the_unusable_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="unusable"), _lock(tmp_path / "file" / ".x.lock"):
        pass
