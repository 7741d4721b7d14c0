"""A reader for MVTec-AD-style trees: ``train/good``, ``test/<class>`` and ``ground_truth/<class>`` masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bdi.errors import InvalidInputError
from bdi.storage.datasets import image_files


@dataclass(frozen=True)
class MvtecItem:
    """One image of an MVTec-AD-style tree."""

    path: Path
    split: str  # "train" | "test"
    label: str  # "ok" | "ng"
    defect_class: str  # "good" or the defect folder name
    mask_path: Path | None


def read_mvtec(root: Path) -> list[MvtecItem]:
    """Items of ``train/good``, ``test/<class>`` (masks from ``ground_truth/<class>/<stem>_mask.png``).

    Sorted by split (train first), class and name. Other ``train/<class>`` folders are ignored: MVTec
    trains on defect-free images only.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"MVTec dataset root not found: {root}")
    if not (root / "train").is_dir() and not (root / "test").is_dir():
        raise InvalidInputError(f"not an MVTec layout (no train/ or test/): {root}")
    items: list[MvtecItem] = []
    for path in image_files(root / "train" / "good"):
        items.append(MvtecItem(path=path, split="train", label="ok", defect_class="good", mask_path=None))
    test_root = root / "test"
    classes = sorted(p.name for p in test_root.iterdir() if p.is_dir()) if test_root.is_dir() else []
    for defect_class in classes:
        for path in image_files(test_root / defect_class):
            mask: Path | None = None
            if defect_class != "good":
                candidate = root / "ground_truth" / defect_class / f"{path.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            items.append(MvtecItem(
                path=path, split="test", label="ok" if defect_class == "good" else "ng",
                defect_class=defect_class, mask_path=mask,
            ))
    return items
