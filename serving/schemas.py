"""Typed JSON response bodies of every route (set as ``response_model``, so OpenAPI documents them); the request
bodies are in :mod:`serving.requests`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bdi.service import (
    Calibration,
    Feedback,
    FitResult,
    InferOutcome,
    InspectionPage,
    ManualCalibration,
    ModelManifest,
    ModelState,
    Region,
    RoiDrift,
    SampleScore,
)

# The JSON bodies of the routes (docs/contract.md "Endpoints", under each route), field order = the body's key
# order. Floats are declared as floats and counts as ints so that validation leaves every value as the route
# computed it.


def png_base64(png: bytes | None) -> str | None:
    """Standard base64 (with padding) of PNG bytes, as the GUI decodes it."""
    return base64.b64encode(png).decode("ascii") if png is not None else None


class Ids(BaseModel):
    """``request_id`` and ``recipe_id``, in every JSON success body (``RequestContext.ids``)."""

    request_id: str
    recipe_id: str


class FitResponse(BaseModel):
    """POST /fit_ok."""

    n_embeddings: int
    coreset_size: int
    token_shape: tuple[int, int]
    coreset_rate_requested: float
    coreset_rate_applied: float
    request_id: str
    recipe_id: str

    @classmethod
    def of(cls, result: FitResult, *, ids: Mapping[str, str]) -> FitResponse:
        """The response's fields of ``result`` (the library's one form of a fit) and the ids."""
        return cls.model_validate({**{name: getattr(result, name) for name in cls.model_fields if name not in ids},
                                   **ids})


class RegionBody(BaseModel):
    """A defect region in crop pixels: bbox ``[x, y, w, h]``, pixel and mm² areas, outer contour ``[[x, y], …]``."""

    bbox: tuple[int, int, int, int]
    area_px: float
    area_mm2: float
    contour: list[list[int]]

    @classmethod
    def of(cls, region: Region) -> RegionBody:
        return cls(bbox=region.bbox, area_px=region.area_px, area_mm2=region.area_mm2, contour=region.contour)


class InferRegion(RegionBody):
    """A /infer region: the bbox also as ``x``, ``y``, ``w``, ``h`` floats."""

    x: float
    y: float
    w: float
    h: float

    @classmethod
    def of(cls, region: Region) -> InferRegion:
        x, y, w, h = region.bbox
        return cls(bbox=region.bbox, area_px=region.area_px, area_mm2=region.area_mm2, contour=region.contour,
                   x=x, y=y, w=w, h=h)


class InferResponse(BaseModel):
    """POST /infer; ``lineage`` names the model that answered (``bdi.storage.lineage.lineage_view``)."""

    score: float
    threshold: float
    token_shape: tuple[int, int]
    heatmap_png_base64: str | None
    regions: list[InferRegion]
    lineage: dict[str, Any] | None
    request_id: str
    recipe_id: str
    decision: Literal["ok", "ng"]
    # additive (docs/design.md "Two thresholds: OK, review, NG"): the score is in the calibration's band (then
    # ``decision`` is BDI_REVIEW_DECISION's side, ng by default); the band's thresholds, null without a band
    review: bool = False
    threshold_low: float | None = None
    threshold_high: float | None = None

    @classmethod
    def of(cls, outcome: InferOutcome, *, ids: Mapping[str, str]) -> InferResponse:
        return cls(score=outcome.result.score, threshold=outcome.threshold, token_shape=outcome.result.token_shape,
                   heatmap_png_base64=png_base64(outcome.heatmap_png),
                   regions=[InferRegion.of(r) for r in outcome.result.regions], lineage=outcome.lineage, **ids,
                   decision=outcome.decision, review=outcome.review, threshold_low=outcome.threshold_low,
                   threshold_high=outcome.threshold_high)


class InferDatasetItem(BaseModel):
    """One scored sample; ``heatmap_png_base64`` only when heatmaps were asked for."""

    label: str
    filename: str
    mm_per_px: float | None
    score: float | None
    threshold: float | None
    regions: list[RegionBody]
    n_regions: int
    error: str | None
    heatmap_png_base64: str | None = None
    # additive, as on InferResponse: the score is in the calibration's band (false without a band or a score);
    # the band's thresholds, null without a band
    review: bool = False
    threshold_low: float | None = None
    threshold_high: float | None = None

    @classmethod
    def of(cls, item: SampleScore, *, include_heatmap: bool) -> InferDatasetItem:
        heatmap = {"heatmap_png_base64": png_base64(item.heatmap_png)} if include_heatmap else {}
        return cls(label=item.label, filename=item.filename, mm_per_px=item.mm_per_px, score=item.score,
                   threshold=item.threshold, regions=[RegionBody.of(r) for r in item.regions],
                   n_regions=len(item.regions), error=item.error, **heatmap, review=item.review,
                   threshold_low=item.threshold_low, threshold_high=item.threshold_high)


class InferDatasetResponse(BaseModel):
    """POST /infer_dataset."""

    status: Literal["ok"] = "ok"
    role_id: str
    roi_id: str
    request_id: str
    recipe_id: str
    model_key: str
    n_total: int
    n_errors: int
    items: list[InferDatasetItem]


def band_fields(calib: Calibration) -> dict[str, Any]:
    """The band's response fields of ``calib`` (empty without a band, so they stay unset)."""
    return calib.band.to_dict() if calib.band is not None else {}


class CalibrateNgResponse(BaseModel):
    """POST /calibrate_ng: the stored calibration's contract keys and the ids."""

    threshold: float
    ok_mean: float
    ng_mean: float
    p99_ok: float | None
    p5_ng: float | None
    mm_per_px: float
    area_mm2_thr: float
    score_percentile: int
    request_id: str
    recipe_id: str
    # additive, only when the threshold detects no NG sample
    # (docs/design.md "Calibrations that detect nothing are flagged")
    warnings: list[str] | None = None
    # additive, only when the calibration has an OK / review / NG band (``Band.to_dict``'s keys,
    # docs/contract.md "The OK / review / NG band")
    threshold_low: float | None = None
    threshold_high: float | None = None
    band_escape_budget: float | None = None
    band_false_reject_budget: float | None = None
    band_collapsed: bool | None = None
    band_escape_rate: float | None = None
    band_false_reject_rate: float | None = None
    review_rate: float | None = None

    @classmethod
    def of(cls, calib: Calibration, *, ids: Mapping[str, str], warnings: Sequence[str] = ()) -> CalibrateNgResponse:
        stats = calib.statistics
        if stats is None or calib.mm_per_px is None:
            raise ValueError("a /calibrate_ng calibration records its statistics and mm_per_px")
        extra: dict[str, Any] = {"warnings": list(warnings)} if warnings else {}
        return cls(threshold=calib.threshold, ok_mean=stats.ok_mean, ng_mean=stats.ng_mean,
                   p99_ok=stats.ok_score_at_percentile, p5_ng=stats.ng_score_at_percentile, mm_per_px=calib.mm_per_px,
                   area_mm2_thr=calib.area_mm2_thr, score_percentile=calib.score_percentile, **ids, **extra,
                   **band_fields(calib))


class CalibrateDatasetResponse(BaseModel):
    """POST /calibrate_dataset."""

    status: Literal["ok"] = "ok"
    threshold: float
    score_percentile: int
    area_mm2_thr: float
    n_ok: int | None
    n_ng: int | None
    request_id: str
    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str
    warnings: list[str] | None = None  # additive, as in CalibrateNgResponse
    # additive, only when the calibration has an OK / review / NG band (``Band.to_dict``'s keys,
    # docs/contract.md "The OK / review / NG band")
    threshold_low: float | None = None
    threshold_high: float | None = None
    band_escape_budget: float | None = None
    band_false_reject_budget: float | None = None
    band_collapsed: bool | None = None
    band_escape_rate: float | None = None
    band_false_reject_rate: float | None = None
    review_rate: float | None = None

    @classmethod
    def of(cls, calib: Calibration, *, ids: Mapping[str, str], warnings: Sequence[str] = ()
           ) -> CalibrateDatasetResponse:
        """The stored calibration's contract keys, the ids and the model it belongs to (``calib.ids``)."""
        if calib.ids is None:
            raise ValueError("a /calibrate_dataset calibration records the model's ids")
        extra: dict[str, Any] = {"warnings": list(warnings)} if warnings else {}
        return cls(status="ok", threshold=calib.threshold, score_percentile=calib.score_percentile,
                   area_mm2_thr=calib.area_mm2_thr, n_ok=calib.n_ok, n_ng=calib.n_ng, **ids,
                   role_id=calib.ids.role_id, roi_id=calib.ids.roi_id, model_key=calib.ids.model_key, **extra,
                   **band_fields(calib))


class CalibrateManualResponse(BaseModel):
    """POST /calibrate_manual: the stored calibration, its ``source`` and the threshold it replaced."""

    status: Literal["ok"] = "ok"
    threshold: float
    previous_threshold: float | None
    source: str
    score_percentile: int
    area_mm2_thr: float
    created_at_utc: str | None
    request_id: str
    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str

    @classmethod
    def of(cls, manual: ManualCalibration, *, ids: Mapping[str, str]) -> CalibrateManualResponse:
        calib = manual.calibration
        if calib.ids is None or calib.source is None:
            raise ValueError("a manual calibration records the model's ids and its source")
        return cls(status="ok", threshold=calib.threshold, previous_threshold=manual.previous_threshold,
                   source=calib.source, score_percentile=calib.score_percentile, area_mm2_thr=calib.area_mm2_thr,
                   created_at_utc=calib.created_at_utc, **ids, role_id=calib.ids.role_id, roi_id=calib.ids.roi_id,
                   model_key=calib.ids.model_key)


class StateResponse(BaseModel):
    """GET /state."""

    status: Literal["ok"] = "ok"
    memory_fitted: bool
    calib_present: bool
    request_id: str
    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str
    lineage: dict[str, Any] | None

    @classmethod
    def of(cls, state: ModelState, *, ids: Mapping[str, str]) -> StateResponse:
        """``model_key`` is the raw effective one."""
        return cls(status="ok", memory_fitted=state.memory_fitted, calib_present=state.calib_present, **ids,
                   role_id=state.ref.role_id, roi_id=state.ref.roi_id, model_key=state.ref.model_key,
                   lineage=state.lineage)


class ManifestResponse(BaseModel):
    """GET /manifest: no top-level ``status``; ``calib`` is the stored calib JSON as it is."""

    role_id: str
    roi_id: str
    recipe_id: str
    model_key: str
    memory: bool
    calib: dict[str, Any] | None
    datasets: dict[str, Any]
    request_id: str
    lineage: dict[str, Any] | None

    @classmethod
    def of(cls, manifest: ModelManifest, *, ids: Mapping[str, str]) -> ManifestResponse:
        """``model_key`` is sanitised the legacy way (contract M2); ``calib`` is the stored object as it is."""
        ref = manifest.ref
        return cls(role_id=ref.role_id, roi_id=ref.roi_id, recipe_id=ids["recipe_id"], model_key=ref.model_key_legacy,
                   memory=manifest.memory, calib=manifest.calib, datasets=manifest.datasets,
                   request_id=ids["request_id"], lineage=manifest.lineage)


class ProgressResponse(BaseModel):
    """GET /progress (additive): how far the last API fit or calibration of one model got (docs/contract.md)."""

    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str
    job: Literal["fit", "calibrate"] | None
    state: Literal["idle", "running", "done", "failed"]
    stage: str | None
    done: int
    total: int
    stages: dict[str, list[int]]  # every stage seen: [done, total]
    started_at_utc: str | None
    updated_at_utc: str | None
    error: str | None
    request_id: str

    @classmethod
    def of(cls, progress: Mapping[str, Any], *, ref_ids: Mapping[str, str], ids: Mapping[str, str]) -> ProgressResponse:
        fields = {name: progress.get(name) for name in ("job", "state", "stage", "done", "total", "stages",
                                                          "started_at_utc", "updated_at_utc", "error")}
        return cls(**ref_ids, **fields, request_id=ids["request_id"])


class HealthResponse(BaseModel):
    """GET /health; ``reason`` only when CUDA is not available."""

    status: Literal["ok"] = "ok"
    device: str
    model: str
    version: str
    request_id: str
    recipe_id: str
    reason: str | None = None
    backbone: str
    weights: dict[str, Any]
    pretrained: bool
    registry: dict[str, Any]
    runtime: str
    runtime_precision: str
    runtime_requested: str
    runtime_fallback: str | None
    runtime_parity: dict[str, Any] | None
    runtime_choice: dict[str, Any] | None = None  # where the runtime was chosen and recorded (issue 30 item 4)
    runtime_precision_choice: str | None = None  # why that precision (BDI_PRECISION=auto: native bf16, parity)
    calibration_warnings: list[dict[str, Any]] | None = None  # calibrations whose threshold detects no NG sample
    auth: Literal["off", "required", "writes"] | None = None  # BDI_AUTH (issue 28, docs/security.md)
    warnings: list[dict[str, Any]] | None = None  # models whose drift is in alarm (docs/monitoring.md)


class AuditPageResponse(BaseModel):
    """GET /audit: one page of audit records (``bdi.security.audit``), oldest first."""

    records: list[dict[str, Any]]
    next_after_seq: int | None
    request_id: str
    recipe_id: str


class KeyInfo(BaseModel):
    """One API key as shown: never its token or hash (``bdi.security.keys.ApiKey.public``)."""

    id: str
    label: str
    scopes: list[str]
    created_utc: str
    expires_utc: str | None = None
    revoked_utc: str | None = None


class KeyListResponse(BaseModel):
    """GET /keys."""

    keys: list[KeyInfo]
    request_id: str
    recipe_id: str


class KeyCreatedResponse(KeyInfo):
    """POST /keys: the new key and its token, shown this once."""

    token: str
    request_id: str
    recipe_id: str


class KeyRevokedResponse(KeyInfo):
    """DELETE /keys/{key_id}: the key as revoked."""

    request_id: str
    recipe_id: str


class UploadResponse(BaseModel):
    """POST /datasets/{ok,ng}/upload: the stored file names."""

    status: Literal["ok"] = "ok"
    saved: list[str]
    request_id: str
    recipe_id: str


class DatasetListResponse(BaseModel):
    """GET /datasets/list."""

    role_id: str
    roi_id: str
    classes: dict[str, Any]
    request_id: str
    recipe_id: str


class SampleMetaResponse(BaseModel):
    """GET /datasets/meta: the sidecar object as stored (its keys win over the ids)."""

    model_config = ConfigDict(extra="allow")

    request_id: Any
    recipe_id: Any


class DeleteResponse(BaseModel):
    """DELETE /datasets/file."""

    deleted: bool
    filename: str
    request_id: str
    recipe_id: str


class ClearResponse(BaseModel):
    """DELETE /datasets/clear; ``resolved_recipe_id`` (additive) is the recipe whose folder was cleared (null: the
    legacy datasets folder, or none found)."""

    cleared: int
    label: str
    resolved_recipe_id: str | None = None
    request_id: str
    recipe_id: str


class InspectionsResponse(BaseModel):
    """GET /inspections: one page of the inspection record, newest first (docs/monitoring.md); ``next_cursor`` is
    passed back as ``cursor`` for the next page (None: the last page)."""

    status: Literal["ok"] = "ok"
    request_id: str
    recipe_id: str
    count: int
    next_cursor: str | None
    items: list[dict[str, Any]]

    @classmethod
    def of(cls, page: InspectionPage, *, ids: Mapping[str, str]) -> InspectionsResponse:
        return cls(**ids, count=len(page.records), next_cursor=page.next_cursor,
                   items=[record.to_dict() for record in page.records])


class MonitorResponse(BaseModel):
    """GET /monitor: the drift of every recorded model (docs/monitoring.md "Drift")."""

    status: Literal["ok"] = "ok"
    request_id: str
    recipe_id: str
    rois: list[dict[str, Any]]

    @classmethod
    def of(cls, drifts: Sequence[RoiDrift], *, ids: Mapping[str, str]) -> MonitorResponse:
        return cls(**ids, rois=[drift.to_dict() for drift in drifts])


class FeedbackResponse(BaseModel):
    """POST /feedback: the stored verdict, the sample it became (``label``/``sample``) and the ids."""

    status: Literal["ok"] = "ok"
    request_id: str
    recipe_id: str
    feedback: dict[str, Any]

    @classmethod
    def of(cls, feedback: Feedback, *, ids: Mapping[str, str]) -> FeedbackResponse:
        return cls(**ids, feedback=feedback.to_dict())
