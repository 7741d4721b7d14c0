"""bench.infer_latency (issue 29's p50 target): two versions of the library timed in one run, interleaved, each in
its own worker process with only its own ``src`` importable; the report's ratio is this tree's p50 over the
baseline's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdi.data.synthetic import write_mvtec_dataset
from bench.infer_latency import main, summarise


def test_ratio_is_this_trees_p50_over_the_baselines() -> None:
    now, then = {"ms": [10.0, 30.0, 20.0]}, {"ms": [10.0, 10.0, 10.0]}
    summary = summarise(now, then, round_ratios=[1.5, 2.5, 2.0])
    assert summary["this_tree"]["p50"] == 20.0 and summary["baseline"]["p50"] == 10.0
    assert summary["ratio_p50"] == pytest.approx(2.0)
    assert summary["round_ratio_median"] == 2.0 and summary["round_ratio_range"] == [1.5, 2.5]


@pytest.mark.slow
def test_times_both_versions_interleaved_and_writes_the_report(tmp_path: Path) -> None:
    data = write_mvtec_dataset(tmp_path / "discs", n_train=4, n_test_good=2, n_test_per_defect=1, size=96)
    out = tmp_path / "out"
    # HEAD as its own baseline: the unpacked copy runs through the same worker path as the tree
    assert main(["--baseline", "HEAD", "--data", str(data), "--backbone", "efficientnet_lite0", "--rounds", "2",
                 "--repeats", "3", "--threads", "1", "--out-dir", str(out)]) == 0
    report = json.loads((out / "infer_latency.json").read_text(encoding="utf-8"))
    # each worker imported its own version of the library, the baseline's from the unpacked commit
    root = Path(__file__).resolve().parents[2]
    assert Path(report["library"]["this_tree"]) == root / "src" / "bdi"
    assert not Path(report["library"]["baseline"]).is_relative_to(root)
    assert len(report["ms"]["this_tree"]) == len(report["ms"]["baseline"]) == 6
    assert all(ms > 0 for ms in report["ms"]["this_tree"] + report["ms"]["baseline"])
    assert report["runtime"]["baseline"]["runtime"] and report["stages"]["this_tree"]["forward"] > 0
    assert report["summary"]["ratio_p50"] == pytest.approx(
        report["summary"]["this_tree"]["p50"] / report["summary"]["baseline"]["p50"])
    assert "p50 ratio (this tree / baseline)" in (out / "infer_latency.md").read_text(encoding="utf-8")
