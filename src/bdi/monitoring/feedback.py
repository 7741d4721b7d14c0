"""Operator feedback on recorded inspections (docs/monitoring.md "Operator feedback"): the verdicts, the append-only
feedback log beside the record, and the rates measured from it per ROI.

A verdict names what the part really was: ``false_reject`` (the model said NG, the part is good: an OK sample),
``confirmed_defect`` (NG and defective: an NG sample) or ``missed_defect`` (the model said OK, the part is
defective: an NG sample). Each is one JSON line in ``<models dir>/_inspections/feedback.jsonl`` (one ``os.write`` on
``O_APPEND``, like the record: feedback is rare, every worker appends to the same file safely).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bdi.errors import InvalidInputError
from bdi.monitoring.record import InspectionRecord

FEEDBACK_FILE = "feedback.jsonl"
FALSE_REJECT, CONFIRMED_DEFECT, MISSED_DEFECT = "false_reject", "confirmed_defect", "missed_defect"
VERDICT_LABEL = {FALSE_REJECT: "ok", CONFIRMED_DEFECT: "ng", MISSED_DEFECT: "ng"}  # the sample each one becomes
VERDICT_DECISION = {FALSE_REJECT: "ng", CONFIRMED_DEFECT: "ng", MISSED_DEFECT: "ok"}  # what the model must have said
MAX_COORDINATE_PX = 1e6  # a corrected region's coordinates (px): beyond any crop, and its area stays finite
AREA_BUCKETS_MM2: tuple[float, ...] = (1.0, 5.0, 20.0)  # recall buckets: <1, 1-5, 5-20, >=20 mm²


@dataclass(frozen=True)
class CorrectedRegion:
    """A corrected defect region in crop pixels: ``bbox`` ``[x, y, w, h]`` or ``polygon`` ``[[x, y], ...]``."""

    bbox: tuple[float, float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if (self.bbox is None) == (self.polygon is None):
            raise InvalidInputError("region: give exactly one of bbox [x, y, w, h] or polygon [[x, y], ...]")
        if self.bbox is not None and (len(self.bbox) != 4 or self.bbox[2] <= 0 or self.bbox[3] <= 0):
            raise InvalidInputError("region.bbox must be [x, y, w, h] with w, h > 0")
        if self.polygon is not None and len(self.polygon) < 3:
            raise InvalidInputError("region.polygon needs at least 3 points")
        values = [*(self.bbox or ()), *(v for point in self.polygon or () for v in point)]
        if not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE_PX for v in values):
            raise InvalidInputError(f"region coordinates must be finite pixel positions within ±{MAX_COORDINATE_PX:g}")

    def area_px(self) -> float:
        """The region's area in px² (the shoelace formula for a polygon)."""
        if self.bbox is not None:
            return float(self.bbox[2] * self.bbox[3])
        assert self.polygon is not None
        pts = self.polygon
        twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))
        return abs(twice) / 2.0

    def to_dict(self) -> dict[str, Any]:
        if self.bbox is not None:
            return {"bbox": list(self.bbox)}
        return {"polygon": [list(p) for p in self.polygon or ()]}


@dataclass(frozen=True)
class Feedback:
    """One operator verdict on one recorded inspection, with where its sample went."""

    ts: str
    verdict: str
    inspection_id: str
    request_id: str | None
    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str
    memory_fingerprint: str | None
    decision: str
    score: float
    area_mm2: float | None  # the defect's area: the corrected region's, else the largest recorded region's
    sample: str | None  # the stored sample's file name
    label: str
    operator: str | None = None
    comment: str | None = None
    region: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feedback | None:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError:
            return None


def check_verdict(verdict: str, record: InspectionRecord) -> str:
    """The sample label of ``verdict`` on ``record``; InvalidInputError for an unknown verdict or one that
    contradicts the recorded decision (a false reject of a part that was passed)."""
    if verdict not in VERDICT_LABEL:
        raise InvalidInputError(f"verdict must be one of {sorted(VERDICT_LABEL)}, got {verdict!r}")
    if VERDICT_DECISION[verdict] != record.decision:
        raise InvalidInputError(
            f"verdict {verdict!r} is for inspections decided {VERDICT_DECISION[verdict]!r}; "
            f"this one was decided {record.decision!r}")
    return VERDICT_LABEL[verdict]


def defect_area_mm2(record: InspectionRecord, region: CorrectedRegion | None) -> float | None:
    """The defect's area for the recall buckets: the operator's region (px² × mm_per_px²), else the record's."""
    if region is not None:
        return region.area_px() * record.mm_per_px**2
    return record.largest_region_mm2


def append_feedback(root: Path, feedback: Feedback) -> None:
    """Append one verdict as one line (one ``os.write`` on ``O_APPEND``)."""
    root.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(feedback.to_dict(), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(root / FEEDBACK_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_feedback(root: Path) -> list[Feedback]:
    """Every verdict, in the order given; torn or foreign lines skipped."""
    try:
        data = (root / FEEDBACK_FILE).read_bytes()
    except FileNotFoundError:
        return []
    out: list[Feedback] = []
    for raw in data.split(b"\n"):
        try:
            obj = json.loads(raw) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        item = Feedback.from_dict(obj) if isinstance(obj, dict) else None
        if item is not None:
            out.append(item)
    return out


def _bucket(area: float | None) -> str:
    if area is None:
        return "unknown"
    bounds = (0.0, *AREA_BUCKETS_MM2)
    for low, high in zip(bounds, (*AREA_BUCKETS_MM2, None), strict=True):
        if high is None or area < high:
            return f"{low:g}-{high:g}" if high is not None else f">={low:g}"
    return "unknown"


def feedback_rates(feedback: Sequence[Feedback], records: Iterable[InspectionRecord]) -> dict[str, Any]:
    """What one ROI's feedback measured, over its recorded inspections: ``false_reject_rate`` (confirmed false
    rejects per inspection), ``escape_rate`` (missed defects per inspection), ``recall`` (confirmed / (confirmed +
    missed) defects) overall and by defect-area bucket (mm²), with the counts. The latest verdict on an inspection
    counts."""
    latest = {f.inspection_id: f for f in feedback}
    n_inspections = sum(1 for _ in records)
    counts = {verdict: sum(1 for f in latest.values() if f.verdict == verdict) for verdict in VERDICT_LABEL}
    by_bucket: dict[str, dict[str, int]] = {}
    for item in latest.values():
        if item.verdict in (CONFIRMED_DEFECT, MISSED_DEFECT):
            bucket = by_bucket.setdefault(_bucket(item.area_mm2), {"detected": 0, "missed": 0})
            bucket["detected" if item.verdict == CONFIRMED_DEFECT else "missed"] += 1
    defects = counts[CONFIRMED_DEFECT] + counts[MISSED_DEFECT]
    return {
        "n_inspections": n_inspections,
        "n_feedback": len(latest),
        **{f"n_{verdict}": n for verdict, n in counts.items()},
        "false_reject_rate": counts[FALSE_REJECT] / n_inspections if n_inspections else None,
        "escape_rate": counts[MISSED_DEFECT] / n_inspections if n_inspections else None,
        "recall": counts[CONFIRMED_DEFECT] / defects if defects else None,
        "recall_by_area_mm2": {name: {**b, "recall": b["detected"] / (b["detected"] + b["missed"])}
                               for name, b in sorted(by_bucket.items())},
    }
