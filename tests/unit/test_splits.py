"""The split rule: interleaved dealing, order by file bytes, stratified by class, pool OK samples feed train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bdi.data.mvtec import read_mvtec
from bdi.data.splits import CALIB, EVAL, TRAIN, SplitItem, assign_splits, interleaved_share, split_mvtec
from bdi.data.synthetic import write_mvtec_dataset


def _item(source: str, label: str, cls: str, sha: str) -> SplitItem:
    return SplitItem(source_split=source, label=label, defect_class=cls, sha256=sha, path=f"/{cls}/{sha}.png")


def test_interleaved_share_picks_the_requested_share_evenly() -> None:
    assert interleaved_share(5, 0.5) == [True, False, True, False, True]
    assert sum(interleaved_share(10, 0.3)) == 3
    assert interleaved_share(0, 0.5) == []


def test_files_are_dealt_in_sha256_order_not_listing_order() -> None:
    items = [_item("test", "ng", "crack", sha) for sha in ("c", "a", "d", "b")]
    splits = assign_splits(items, calib_fraction=0.5, train_fraction=0.5)
    # sha order a, b, c, d -> calib, eval, calib, eval
    assert dict(zip("cadb", splits, strict=True)) == {"a": CALIB, "b": EVAL, "c": CALIB, "d": EVAL}


def test_every_defect_class_is_split_on_its_own() -> None:
    items = [_item("train", "ok", "good", "t0")] + [
        _item("test", "ng" if cls != "good" else "ok", cls, f"{cls}{i}") for cls in ("good", "pit", "scratch")
        for i in range(2)
    ]
    splits = assign_splits(items, calib_fraction=0.5, train_fraction=0.5)
    assert splits[0] == TRAIN
    for cls in ("good", "pit", "scratch"):
        assert sorted(s for it, s in zip(items[1:], splits[1:], strict=True) if it.defect_class == cls) == [CALIB, EVAL]


def test_pool_ok_samples_feed_train_first_and_ng_samples_never_do() -> None:
    items = [_item("pool", "ok", "good", f"o{i}") for i in range(6)] + [_item("pool", "ng", "ng", "n0"),
                                                                         _item("pool", "ng", "ng", "n1")]
    splits = assign_splits(items, calib_fraction=0.5, train_fraction=0.5)
    assert Counter(splits[:6]) == {TRAIN: 3, CALIB: 2, EVAL: 1}
    assert sorted(splits[6:]) == [CALIB, EVAL]


def test_split_mvtec_does_not_depend_on_file_names(tmp_path: Path) -> None:
    root = write_mvtec_dataset(tmp_path / "mvtec", n_train=2, n_test_good=4, n_test_per_defect=2, size=48, seed=5)
    items = read_mvtec(root)
    before = {it.path.read_bytes(): s for it, s in zip(items, split_mvtec(items, calib_fraction=0.5), strict=True)}
    for path in sorted((root / "test" / "good").glob("*.png")):
        path.rename(path.with_name(f"z_{path.name}"))
    items = read_mvtec(root)
    after = {it.path.read_bytes(): s for it, s in zip(items, split_mvtec(items, calib_fraction=0.5), strict=True)}
    assert before == after
    assert Counter(after.values()) == {TRAIN: 2, CALIB: 2 + 3, EVAL: 2 + 3}
