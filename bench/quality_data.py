"""The quality benchmark's datasets: MVTec-layout folders split into train / calib / eval as the pipeline does.

The split is ``bdi.data.splits.split_mvtec`` (the rule ``pipelines/ingest.py`` applies) with the pipeline's
default ``calib_fraction``; ground-truth masks are binarised with the pipeline's default ``mask_threshold``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from bdi.data.metrics import MASK_THRESHOLD, binarize_mask
from bdi.data.mvtec import MvtecItem, read_mvtec
from bdi.data.splits import CALIB, CALIB_FRACTION, EVAL, TRAIN, split_mvtec
from bdi.data.synthetic import write_mvtec_dataset
from bdi.patchcore.imaging import decode_image

SYNTHETIC_FULL = {"n_train": 20, "n_test_good": 10, "n_test_per_defect": 6, "size": 256, "seed": 0}
SYNTHETIC_QUICK = {"n_train": 4, "n_test_good": 4, "n_test_per_defect": 2, "size": 128, "seed": 0}
QUICK_TRAIN = 8  # magnetic tile --quick: the first N train/good images
QUICK_PER_CLASS = 2  # ... and N per defect class in each of calib and eval


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes:
        name: path relative to the dataset root.
        data: the file's bytes (what ``/infer`` receives).
        image: decoded BGR ``uint8`` ``(H, W, 3)``.
        label: 1 = NG (defective), 0 = OK.
        defect_class: ``good`` or the defect folder.
        mask: ``(H, W)`` bool ground truth, None for OK images (and NG images without a mask file).
    """

    name: str
    data: bytes
    image: np.ndarray
    label: int
    defect_class: str
    mask: np.ndarray | None


@dataclass(frozen=True)
class BenchDataset:
    name: str
    source: str
    train: list[Sample]
    calib: list[Sample]
    eval: list[Sample]

    def swapped(self) -> BenchDataset:
        """The halves exchanged: threshold from the eval half, figures on the calib half."""
        return replace(self, calib=self.eval, eval=self.calib)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {defect_class: n}}``."""
        return {split: dict(sorted(Counter(s.defect_class for s in samples).items()))
                for split, samples in (("train", self.train), ("calib", self.calib), ("eval", self.eval))}


def _mask(item: MvtecItem, shape: tuple[int, int]) -> np.ndarray | None:
    if item.mask_path is None:
        return None
    raw = cv2.imdecode(np.frombuffer(item.mask_path.read_bytes(), dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if raw is None or raw.shape[:2] != shape:
        raise ValueError(f"mask {item.mask_path} is unreadable or not the size of its image")
    mask: np.ndarray = binarize_mask(raw, threshold=MASK_THRESHOLD)
    return mask


def _sample(item: MvtecItem, root: Path) -> Sample:
    data = item.path.read_bytes()
    image = decode_image(data, name=item.path.name)
    return Sample(name=item.path.relative_to(root).as_posix(), data=data, image=image,
                  label=1 if item.label == "ng" else 0, defect_class=item.defect_class,
                  mask=_mask(item, image.shape[:2]))


def _first_per_class(items: Sequence[MvtecItem], n: int) -> list[MvtecItem]:
    kept: dict[str, int] = defaultdict(int)
    out: list[MvtecItem] = []
    for item in items:
        if kept[item.defect_class] < n:
            kept[item.defect_class] += 1
            out.append(item)
    return out


def load_mvtec(name: str, root: Path, *, quick: bool = False) -> BenchDataset:
    """Read and split an MVTec-layout folder; ``quick`` keeps a small subset (the split is made first)."""
    root = Path(root)
    items = read_mvtec(root)
    splits = split_mvtec(items, calib_fraction=CALIB_FRACTION)
    parts: dict[str, list[MvtecItem]] = {TRAIN: [], CALIB: [], EVAL: []}
    for item, split in zip(items, splits, strict=True):
        parts[split].append(item)
    if quick:
        parts = {TRAIN: parts[TRAIN][:QUICK_TRAIN], CALIB: _first_per_class(parts[CALIB], QUICK_PER_CLASS),
                 EVAL: _first_per_class(parts[EVAL], QUICK_PER_CLASS)}
    return BenchDataset(name=name, source=str(root), **{
        split: [_sample(item, root) for item in members] for split, members in parts.items()
    })


def synthetic_dataset(work: Path, *, quick: bool = False) -> BenchDataset:
    """The project's seeded synthetic discs (``bdi.data.synthetic``), written under ``work`` and split."""
    params = SYNTHETIC_QUICK if quick else SYNTHETIC_FULL
    root = write_mvtec_dataset(work / "synthetic", n_train=params["n_train"], n_test_good=params["n_test_good"],
                               n_test_per_defect=params["n_test_per_defect"], size=params["size"],
                               seed=params["seed"])
    dataset = load_mvtec("synthetic", root)
    described = ", ".join(f"{k}={v}" for k, v in params.items())
    return BenchDataset(name=dataset.name, source=f"bdi.data.synthetic.write_mvtec_dataset({described})",
                        train=dataset.train, calib=dataset.calib, eval=dataset.eval)
