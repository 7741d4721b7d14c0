"""POST /infer (one crop) and POST /infer_dataset (every stored sample); see docs/contract.md."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Response, UploadFile

from bdi.logging import slog
from bdi.service import LABELS
from serving.auth import scoped
from serving.deps import MetricsDep, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.parsing import read_upload
from serving.requests import InferDatasetRequest
from serving.schemas import InferDatasetItem, InferDatasetResponse, InferResponse

router = APIRouter(tags=["inference"], dependencies=[scoped("inspect")])


@router.post("/infer", dependencies=[error_style("model")], response_model=InferResponse)
def infer(
    ctx: RequestCtx,
    service: ServiceDep,
    metrics: MetricsDep,
    response: Response,
    role_id: Annotated[str, Form()],
    roi_id: Annotated[str, Form()],
    mm_per_px: Annotated[float, Form()],
    image: Annotated[UploadFile, File()],
    shape: Annotated[str | None, Form()] = None,
    include_heatmap: Annotated[bool | None, Form()] = None,
    model_key: Annotated[str | None, Form()] = None,
) -> InferResponse:
    """Score one ROI crop; ``shape`` (JSON text) masks it; the heatmap defaults to NG results only. The stage
    timings go in a standard ``Server-Timing`` header (additive; the body stays the contract's) and, with the
    decision, score and defect area, into the metrics (docs/metrics.md)."""
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    _, data = read_upload(image, limits=service.limits)
    slog("infer.request", image_bytes_len=len(data), mm_per_px=mm_per_px, shape_present=bool(shape),
         include_heatmap=include_heatmap, model_key=ref.model_key)
    outcome = service.infer(ref=ref, mm_per_px=mm_per_px, image=data, shape=shape,
                            include_heatmap=include_heatmap)
    response.headers["Server-Timing"] = server_timing(outcome.result.timings_ms)
    metrics.observe_infer(ids={"recipe_id": ref.recipe_id, "role_id": ref.role_id, "roi_id": ref.roi_id},
                          outcome=outcome)
    return InferResponse.of(outcome, ids=ctx.ids())


def server_timing(timings_ms: Mapping[str, float]) -> str:
    """The W3C ``Server-Timing`` value of stage timings: ``decode;dur=1.2, forward;dur=30.5`` (ms)."""
    return ", ".join(f"{_metric_name(stage)};dur={float(ms):.3f}" for stage, ms in timings_ms.items())


def _metric_name(stage: str) -> str:
    """A stage name as an RFC 7230 token (letters, digits and ``-_.`` kept, anything else ``_``)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in stage) or "stage"


@router.post("/infer_dataset", dependencies=[error_style("batch")], openapi_extra=InferDatasetRequest.openapi(),
             response_model=InferDatasetResponse, response_model_exclude_unset=True)
def infer_dataset(
    ctx: RequestCtx, service: ServiceDep, body: Annotated[dict[str, Any], Body()]
) -> InferDatasetResponse:
    """Score every stored sample of the given labels with the calibrated threshold."""
    req = InferDatasetRequest.parse(body)
    ref = ctx.model_ref(role_id=req.role_id, roi_id=req.roi_id, model_key=req.model_key_str)
    include_heatmap = bool(req.include_heatmap)
    items = service.infer_dataset(
        ref=ref,
        labels=LABELS if req.labels is None else req.labels,
        include_heatmap=include_heatmap,
        default_mm_per_px=req.default_mm_per_px,
    )
    n_errors = sum(1 for item in items if item.error is not None)
    slog("infer_dataset.response", model_key=ref.model_key, n_total=len(items), n_errors=n_errors)
    return InferDatasetResponse(
        status="ok", role_id=ref.role_id, roi_id=ref.roi_id, **ctx.ids(), model_key=ref.model_key,
        n_total=len(items), n_errors=n_errors,
        items=[InferDatasetItem.of(item, include_heatmap=include_heatmap) for item in items],
    )
