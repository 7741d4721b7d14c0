"""Operator feedback (``POST /feedback``, docs/monitoring.md "Operator feedback"): a verdict on a recorded inspection
becomes a sample of that ROI's dataset, OK for a false reject and NG for a confirmed or missed defect, with its
provenance in the sample's sidecar, so the next fit or calibration from the stored samples (``use_dataset``, the
pipeline's ``server`` ingest) learns from it.

The sample is the inspected image itself: the copy the record kept (``BDI_INSPECTIONS_STORE_IMAGES=1``), else the
image sent with the feedback, which must be the inspected one (its sha256 is checked against the record's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from bdi.errors import BDIError, InvalidInputError, NotFoundError
from bdi.logging import slog
from bdi.monitoring.feedback import (
    CorrectedRegion,
    Feedback,
    append_feedback,
    check_verdict,
    defect_area_mm2,
    read_feedback,
)
from bdi.monitoring.record import InspectionQuery, InspectionRecord, inspections_dir, read_records
from bdi.patchcore.imaging import parse_shape
from bdi.refs import DatasetRef
from bdi.service.context import ServiceContext
from bdi.service.recording import image_suffix
from bdi.storage.datasets import UploadItem
from bdi.storage.fsio import utc_now_iso

SAMPLE_SOURCE = "feedback"  # the sidecar's ``source`` of a sample made from feedback


@dataclass(frozen=True)
class FeedbackRequest:
    """What an operator says about one inspection (the ``POST /feedback`` body)."""

    recipe_id: str
    request_id: str
    verdict: str
    region: CorrectedRegion | None = None
    operator: str | None = None
    comment: str | None = None
    image: bytes | None = None  # the inspected image, when the record kept none


def find_inspection(ctx: ServiceContext, *, recipe_id: str, request_id: str) -> InspectionRecord:
    """The newest record of ``request_id`` in ``recipe_id``; NotFoundError when there is none."""
    root = inspections_dir(ctx.settings.models_dir)
    for record in read_records(root, InspectionQuery(recipe_id=recipe_id)):
        if record.request_id == request_id:
            return record
    raise NotFoundError(f"no recorded inspection with request_id {request_id!r} in recipe {recipe_id!r}")


def _inspected_image(ctx: ServiceContext, record: InspectionRecord, sent: bytes | None) -> bytes:
    if record.image_file is not None:
        try:
            return (inspections_dir(ctx.settings.models_dir) / record.image_file).read_bytes()
        except OSError:
            pass  # expired by the retention: the sent image may stand in
    if sent is None:
        raise InvalidInputError(
            "the inspection's image was not kept (BDI_INSPECTIONS_STORE_IMAGES=0, or expired): send it as image")
    if hashlib.sha256(sent).hexdigest() != record.image_sha256:
        raise InvalidInputError("image is not the inspected image (its sha256 differs from the record's)")
    return sent


def _sample_exists(ctx: ServiceContext, dataset: DatasetRef, label: str, name: str) -> bool:
    try:
        return ctx.datasets.file_path(dataset, label, name).is_file()
    except BDIError:
        return False


def give_feedback(ctx: ServiceContext, req: FeedbackRequest) -> Feedback:
    """Check the verdict against the recorded decision, store the image as an OK or NG sample of the ROI with its
    provenance, and append the verdict to the feedback log; the stored verdict. The same verdict on the same
    inspection again returns the first one (its sample still stored) and stores nothing."""
    record = find_inspection(ctx, recipe_id=req.recipe_id, request_id=req.request_id)
    label = check_verdict(req.verdict, record)
    root = inspections_dir(ctx.settings.models_dir)
    dataset = DatasetRef(recipe_id=record.recipe_id, role_id=record.role_id, roi_id=record.roi_id)
    for earlier in reversed(read_feedback(root)):  # the same verdict again (a double click): one sample, not two
        if earlier.inspection_id == record.id and earlier.verdict == req.verdict and earlier.sample is not None \
                and _sample_exists(ctx, dataset, earlier.label, earlier.sample):
            slog("feedback.repeated", verdict=req.verdict, sample=earlier.sample, inspection_id=record.id)
            return earlier
    image = _inspected_image(ctx, record, req.image)
    ctx.decode(image, name="image")  # the sample must be usable by a fit
    ts = utc_now_iso()
    area = defect_area_mm2(record, req.region)
    provenance = {
        "source": SAMPLE_SOURCE, "verdict": req.verdict, "inspection_id": record.id,
        "inspection_request_id": record.request_id, "inspected_at_utc": record.ts, "feedback_at_utc": ts,
        "decision": record.decision, "score": record.score, "threshold": record.threshold,
        "memory_fingerprint": record.memory_fingerprint, "operator": req.operator, "comment": req.comment,
        "region": req.region.to_dict() if req.region is not None else None, "defect_area_mm2": area,
    }
    meta: dict[str, object] = {"mm_per_px": record.mm_per_px, "feedback": provenance}
    if record.shape_json:
        parse_shape(record.shape_json)
        meta["shape_json"] = record.shape_json
    (name,) = ctx.datasets.save(dataset, label, [UploadItem(
        data=image, client_filename=f"feedback-{record.id}{image_suffix(image)}", meta=meta)])
    feedback = Feedback(
        ts=ts, verdict=req.verdict, inspection_id=record.id, request_id=record.request_id,
        recipe_id=record.recipe_id, role_id=record.role_id, roi_id=record.roi_id, model_key=record.model_key,
        memory_fingerprint=record.memory_fingerprint, decision=record.decision, score=record.score, area_mm2=area,
        sample=name, label=label, operator=req.operator, comment=req.comment,
        region=req.region.to_dict() if req.region is not None else None,
    )
    append_feedback(root, feedback)
    slog("feedback.stored", verdict=req.verdict, label=label, sample=name, inspection_id=record.id,
         model_key=record.model_key, meta=json.dumps(provenance, default=str)[:500])
    return feedback
