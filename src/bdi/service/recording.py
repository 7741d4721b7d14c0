"""Recording each ``/infer`` decision in the inspection record (bdi.monitoring.record): what the answer, the model's
lineage and the decoded crop say, built and appended after the answer is decided. A recording failure is logged and
never fails the request."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bdi.config import Settings
from bdi.logging import current_context, slog
from bdi.monitoring.imagestats import image_stats
from bdi.monitoring.record import InspectionLog, InspectionRecord, RecordPolicy, inspections_dir, new_record_id
from bdi.refs import ModelRef
from bdi.service.results import InferOutcome
from bdi.storage.fsio import utc_now_iso

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
)


def inspection_log(settings: Settings) -> InspectionLog | None:
    """This process's record writer of ``settings`` (None when ``inspections_record`` is off)."""
    if not settings.inspections_record:
        return None
    policy = RecordPolicy(
        segment_max_bytes=settings.inspections_segment_max_bytes,
        segment_max_age_s=settings.inspections_segment_max_age_s,
        retention_days=settings.inspections_retention_days,
        store_images=settings.inspections_store_images,
        image_max_bytes=settings.inspections_image_max_bytes,
    )
    return InspectionLog(inspections_dir(settings.models_dir), policy)


def image_suffix(image: bytes) -> str:
    """The file suffix of an encoded image, from its first bytes (``.img`` when unknown)."""
    return next((suffix for magic, suffix in _MAGIC if image.startswith(magic)), ".img")


def build_record(
    *, ref: ModelRef, image: bytes, crop: np.ndarray, mm_per_px: float, outcome: InferOutcome,
    image_file: str | None = None, sha256: str | None = None, shape: str | Mapping[str, Any] | None = None,
) -> InspectionRecord:
    """The record of one answered ``/infer``: ``crop`` is the decoded image (statistics), ``image`` its bytes."""
    lineage: dict[str, Any] = outcome.lineage or {}
    result = outcome.result
    stats = image_stats(crop)
    areas = [region.area_mm2 for region in result.regions]
    version = lineage.get("registered_version")
    return InspectionRecord(
        id=new_record_id(), ts=utc_now_iso(), request_id=current_context().get("request_id"),
        recipe_id=ref.recipe_id, role_id=ref.role_id, roi_id=ref.roi_id, model_key=ref.model_key,
        memory_fingerprint=lineage.get("memory_fingerprint"), registered_model=lineage.get("registered_model"),
        registered_version=int(version) if isinstance(version, int) else None,
        registered_alias=lineage.get("registered_alias"),
        score=float(result.score), threshold=float(outcome.threshold), decision=outcome.decision,
        review=outcome.review, threshold_low=outcome.threshold_low, threshold_high=outcome.threshold_high,
        mm_per_px=float(mm_per_px), n_regions=len(areas), largest_region_mm2=max(areas) if areas else None,
        image_sha256=sha256 or hashlib.sha256(image).hexdigest(), image_bytes=len(image),
        width=int(crop.shape[1]), height=int(crop.shape[0]),
        brightness=stats.brightness, contrast=stats.contrast, sharpness=stats.sharpness,
        image_file=image_file, shape_json=_shape_text(shape), pid=os.getpid(), timings_ms=dict(result.timings_ms),
    )


def _shape_text(shape: str | Mapping[str, Any] | None) -> str | None:
    if shape is None or (isinstance(shape, str) and not shape.strip()):
        return None
    return shape if isinstance(shape, str) else json.dumps(dict(shape), separators=(",", ":"))


def record_inference(
    log: InspectionLog, *, ref: ModelRef, image: bytes, crop: np.ndarray, mm_per_px: float, outcome: InferOutcome,
    shape: str | Mapping[str, Any] | None = None,
) -> InspectionRecord | None:
    """Append the record of one answered ``/infer`` (and keep the image when the settings say so); the record, or
    None when writing failed (logged as ``inspections.record_failed``: the answer stands)."""
    try:
        sha256 = hashlib.sha256(image).hexdigest()
        image_file = log.store_image(image, sha256=sha256, suffix=image_suffix(image))
        record = build_record(ref=ref, image=image, crop=crop, mm_per_px=mm_per_px, outcome=outcome,
                              image_file=image_file, sha256=sha256, shape=shape)
        log.append(record)
    except Exception as exc:  # noqa: BLE001 - diagnostics must never fail the request they describe
        slog("inspections.record_failed", error=f"{type(exc).__name__}: {exc}", model_key=ref.model_key)
        return None
    return record
