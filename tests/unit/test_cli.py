from __future__ import annotations

from pathlib import Path

import pytest

from bdi.cli import main
from bdi.datasets import read_mvtec


def test_demo_data_writes_a_readable_mvtec_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    assert main(["demo-data", str(out), "--n-train", "3", "--n-test-good", "2", "--n-test-per-defect", "1",
                 "--size", "64"]) == 0
    items = read_mvtec(out)
    assert sum(i.split == "train" for i in items) == 3
    assert all(i.mask_path is not None and i.mask_path.is_file() for i in items if i.label == "ng")


def test_sync_with_an_unreachable_tracking_store_exits_non_zero_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sync", "--models-dir", str(tmp_path / "m"), "--tracking-uri", "bogus-scheme://nowhere",
                 "--project-root", str(tmp_path)])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("bdi sync:")
