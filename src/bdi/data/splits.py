"""Deterministic, stratified dataset splits: the one home of the rule (the pipeline's ingest, the benchmark).

Every file goes to ``train`` (it fits the memory), ``calib`` (it sets the threshold) or ``eval`` (it measures).
Within every (source split, label, defect class) group the files are ordered by the sha256 of their bytes
(the path only breaks ties) and dealt out in that order (:func:`interleaved_share`), so a split never depends on file
names or listing order:

* MVTec ``train/good`` (source split ``train``) → ``train``;
* each MVTec test class (source split ``test``) → ``calib`` (a ``calib_fraction`` share, interleaved) and
  ``eval`` (the rest);
* the GUI's OK samples (source split ``pool``) → ``train`` (a ``train_fraction`` share), the remaining OK
  and all NG samples → ``calib`` / ``eval`` as above.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from bdi.data.mvtec import MvtecItem
from bdi.digest import file_sha256

TRAIN, CALIB, EVAL = "train", "calib", "eval"

CALIB_FRACTION = 0.5  # share of every test class that calibrates; the rest evaluates
TRAIN_FRACTION = 0.5  # server samples only: share of the OK samples that fit the memory


def interleaved_share(n: int, fraction: float) -> list[bool]:
    """Which of ``n`` ordered items go to the first part: ``ceil(n·fraction)`` of them, evenly interleaved.

    Item ``i`` is taken when ``ceil((i+1)·f) > ceil(i·f)``: for f = 0.5 that is items 0, 2, 4, …
    """
    return [math.ceil((i + 1) * fraction - 1e-9) > math.ceil(i * fraction - 1e-9) for i in range(n)]


@dataclass(frozen=True)
class SplitItem:
    """What the rule looks at for one file.

    Attributes:
        source_split: ``train`` (MVTec train/good), ``test`` (MVTec test/<class>) or ``pool`` (GUI samples).
        label: ``ok`` or ``ng``.
        defect_class: ``good``, the MVTec defect folder, or ``ng`` (GUI samples).
        sha256: hex digest of the file's bytes: the order within a group.
        path: breaks ties between files with the same bytes.
    """

    source_split: str
    label: str
    defect_class: str
    sha256: str
    path: str


def assign_splits(items: Sequence[SplitItem], *, calib_fraction: float, train_fraction: float) -> list[str]:
    """The split (``train`` | ``calib`` | ``eval``) of every item, aligned with ``items`` (module docstring)."""
    splits: list[str] = [""] * len(items)
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if item.source_split == "train":
            splits[i] = TRAIN
        else:
            groups[(item.source_split, item.label, item.defect_class)].append(i)
    for (source_split, label, _cls), members in sorted(groups.items()):
        members.sort(key=lambda i: (items[i].sha256, items[i].path))
        if source_split == "pool" and label == "ok":
            to_train = interleaved_share(len(members), train_fraction)
            for i, t in zip(members, to_train, strict=True):
                if t:
                    splits[i] = TRAIN
            members = [i for i, t in zip(members, to_train, strict=True) if not t]
        for i, to_calib in zip(members, interleaved_share(len(members), calib_fraction), strict=True):
            splits[i] = CALIB if to_calib else EVAL
    return splits


def split_mvtec(items: Sequence[MvtecItem], *, calib_fraction: float) -> list[str]:
    """The split of every item of ``bdi.data.mvtec.read_mvtec``, aligned with ``items``.

    The same as the pipeline's ingest stage gives them when every file is valid and distinct (ingest also
    rejects unreadable files and exact duplicates before splitting).
    """
    keyed = [
        SplitItem(source_split=it.split, label=it.label, defect_class=it.defect_class,
                  sha256=file_sha256(it.path), path=str(it.path))
        for it in items
    ]
    return assign_splits(keyed, calib_fraction=calib_fraction, train_fraction=1.0)
