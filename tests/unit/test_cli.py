from __future__ import annotations

from pathlib import Path

import pytest

from bdi.cli import main
from bdi.data.mvtec import read_mvtec
from tests.helpers.tiny import TINY_ENV


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


def test_export_writes_the_checked_export_where_servers_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bdi.runtime.export import load_export

    for name, value in {**TINY_ENV, "BDI_INPUT_SIZE": "56", "BDI_WEIGHTS_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    assert main(["export", "--runtime", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "parity passed: onnxruntime" in out
    [folder] = [p for p in (tmp_path / "cache" / "exports").iterdir() if p.is_dir()]
    assert load_export(folder).manifest.parity["onnxruntime"]["passed"] is True
