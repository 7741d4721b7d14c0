"""POST /calibrate_ng (client scores), POST /calibrate_dataset (stored samples) and the additive POST
/calibrate_manual (a threshold an operator chose, from the web page); see docs/contract.md."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body

from bdi.logging import slog
from serving.audit import AuditDep
from serving.auth import scoped
from serving.deps import MetricsDep, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.requests import CalibrateDatasetRequest, CalibrateManualRequest, CalibrateNgRequest
from serving.schemas import CalibrateDatasetResponse, CalibrateManualResponse, CalibrateNgResponse

router = APIRouter(tags=["calibration"], dependencies=[scoped("train")])

JsonBody = Annotated[dict[str, Any], Body()]


@router.post("/calibrate_ng", dependencies=[error_style("model")], openapi_extra=CalibrateNgRequest.openapi(),
             response_model=CalibrateNgResponse, response_model_exclude_unset=True)
def calibrate_ng(ctx: RequestCtx, service: ServiceDep, audit: AuditDep, metrics: MetricsDep,
                 body: JsonBody) -> CalibrateNgResponse:
    """Threshold from OK/NG scores the client computed; NaN/inf scores are dropped."""
    started = time.perf_counter()
    req = CalibrateNgRequest.parse(body)
    ref = ctx.model_ref(role_id=req.role_id, roi_id=req.roi_id, model_key=req.model_key_str)
    slog("calibrate_ng.request", model_key=ref.model_key, ok_count=len(req.ok_scores or ()),
         ng_count=len(req.ng_scores or ()), mm_per_px=req.mm_per_px, area_mm2_thr=req.area_mm2_thr,
         score_percentile=req.score_percentile)
    with audit.change("calibrate", ref, source="scores"):
        calib = service.calibrate_from_scores(
            ref=ref,
            ok_scores=req.ok_scores or [],
            ng_scores=req.ng_scores,
            mm_per_px=req.mm_per_px,
            score_percentile=req.score_percentile,
            area_mm2_thr=req.area_mm2_thr,
        )
    metrics.observe_calibration(method="scores", seconds=time.perf_counter() - started)
    slog("calibrate.saved", model_key=ref.model_key, threshold=calib.threshold)
    warnings = service.detection_warnings(ref=ref, calib=calib)
    response = CalibrateNgResponse.of(calib, ids=ctx.ids(), warnings=warnings)
    slog("calibrate_ng.response", model_key=ref.model_key,
         **response.model_dump(include={"threshold", "ok_mean", "ng_mean", "p99_ok", "p5_ng"}))
    return response


@router.post("/calibrate_dataset", dependencies=[error_style("batch")],
             openapi_extra=CalibrateDatasetRequest.openapi(), response_model=CalibrateDatasetResponse,
             response_model_exclude_unset=True)
def calibrate_dataset(
    ctx: RequestCtx, service: ServiceDep, audit: AuditDep, metrics: MetricsDep, body: JsonBody
) -> CalibrateDatasetResponse:
    """Score every stored OK/NG sample with the fitted memory and write a new calibration."""
    started = time.perf_counter()
    req = CalibrateDatasetRequest.parse(body)
    ref = ctx.model_ref(role_id=req.role_id, roi_id=req.roi_id, model_key=req.model_key_str)
    with audit.change("calibrate", ref, source="dataset"):
        calib = service.calibrate_dataset(
            ref=ref,
            score_percentile=req.score_percentile,
            area_mm2_thr=req.area_mm2_thr,
            default_mm_per_px=req.default_mm_per_px,
            require_ng=True if req.require_ng is None else req.require_ng,
        )
    metrics.observe_calibration(method="dataset", seconds=time.perf_counter() - started)
    slog("calibrate.saved", model_key=ref.model_key, threshold=calib.threshold, n_ok=calib.n_ok, n_ng=calib.n_ng)
    warnings = service.detection_warnings(ref=ref, calib=calib)
    return CalibrateDatasetResponse.of(calib, ids=ctx.ids(), warnings=warnings)


@router.post("/calibrate_manual", dependencies=[error_style("model")], openapi_extra=CalibrateManualRequest.openapi(),
             response_model=CalibrateManualResponse)
def calibrate_manual(
    ctx: RequestCtx, service: ServiceDep, audit: AuditDep, metrics: MetricsDep, body: JsonBody
) -> CalibrateManualResponse:
    """Store an operator's threshold as the calibration (``source: manual``), bound to the fitted memory;
    the answer names the threshold it replaced, so a client can restore it the same way."""
    started = time.perf_counter()
    req = CalibrateManualRequest.parse(body)
    ref = ctx.model_ref(role_id=req.role_id, roi_id=req.roi_id, model_key=req.model_key_str)
    with audit.change("calibrate", ref, source="manual"):
        manual = service.calibrate_manual(ref=ref, threshold=req.threshold)
    metrics.observe_calibration(method="manual", seconds=time.perf_counter() - started)
    slog("calibrate.saved", model_key=ref.model_key, threshold=manual.calibration.threshold, source="manual",
         previous_threshold=manual.previous_threshold)
    return CalibrateManualResponse.of(manual, ids=ctx.ids())
