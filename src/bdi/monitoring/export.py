"""The inspection record as one table for a quality engineer: CSV or Parquet (``bdi inspections export``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bdi.errors import InvalidInputError
from bdi.monitoring.record import InspectionRecord

EXPORT_FORMATS = ("csv", "parquet")


def records_frame(records: Sequence[InspectionRecord]) -> pd.DataFrame:
    """One row per record (:meth:`InspectionRecord.flat`), in the given order."""
    return pd.DataFrame.from_records([record.flat() for record in records])


def export_records(records: Sequence[InspectionRecord], out: Path, *, fmt: str) -> Path:
    """Write ``records`` to ``out`` as ``fmt`` (``csv`` or ``parquet``, via pyarrow); ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    frame = records_frame(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False, engine="pyarrow")
    return out
