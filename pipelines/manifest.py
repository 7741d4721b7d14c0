"""``data/manifest.csv``: one typed row per ingested image, written by ingest and read by the later stages."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from bdi.refs import ModelRef
from bdi.storage.fsio import atomic_write_bytes

SPLITS = ("train", "calib", "eval")  # manifest ``split`` values, in pipeline order


class PipelineDataError(RuntimeError):
    """The data cannot feed a stage (no images for a model, missing upstream output)."""


@dataclass(frozen=True)
class ManifestRow:
    """One image of one model: where it is, its split and label, and what ingest checked about it."""

    file: str  # relative to the project root (``../`` allowed), POSIX separators
    recipe: str
    role: str
    roi: str
    model_key: str
    split: str  # one of SPLITS
    label: str  # ok | ng
    defect_class: str  # good | <class> | ng (server samples)
    mask: str  # ground-truth mask file like ``file``; "" = none
    mm_per_px: float
    roi_shape: str  # JSON text; "" = the full image
    width: int
    height: int
    sha256: str

    def of_model(self, ref: ModelRef) -> bool:
        return (self.recipe, self.role, self.roi) == (ref.recipe_id, ref.role_id, ref.roi_id)


MANIFEST_COLUMNS = tuple(f.name for f in fields(ManifestRow))
_NUMBER_COLUMNS: dict[str, Callable[[str], Any]] = {"mm_per_px": float, "width": int, "height": int}


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> Path:
    """Write the rows as CSV (header ``MANIFEST_COLUMNS``) atomically, creating the parent folder."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(astuple(row) for row in rows)
    atomic_write_bytes(Path(path), text.getvalue().encode("utf-8"))
    return Path(path)


def read_manifest(path: Path) -> list[ManifestRow]:
    """The ingest manifest's rows, in file order."""
    path = Path(path)
    if not path.is_file():
        raise PipelineDataError(f"manifest {path} is missing: run the ingest stage first")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise PipelineDataError(f"manifest {path} lacks columns {missing}: run the ingest stage again")
        try:
            return [_parse_row(record) for record in reader]
        except ValueError as exc:
            raise PipelineDataError(f"manifest {path} has a malformed row ({exc}): run the ingest stage again") from exc


def _parse_row(record: Mapping[str, str]) -> ManifestRow:
    values: dict[str, Any] = {c: _NUMBER_COLUMNS.get(c, str)(record[c]) for c in MANIFEST_COLUMNS}
    return ManifestRow(**values)


def model_rows(rows: Sequence[ManifestRow], ref: ModelRef, *, split: str | None = None) -> list[ManifestRow]:
    """The rows of one model (and one split unless None), in manifest order."""
    return [r for r in rows if r.of_model(ref) and (split is None or r.split == split)]
