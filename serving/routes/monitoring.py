"""GET /inspections (the inspection record, filtered and paged), GET /monitor (drift per ROI) and POST /feedback
(an operator's verdict becomes a sample): docs/monitoring.md; additive routes."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request

from bdi.errors import InvalidInputError
from bdi.service import CorrectedRegion, FeedbackRequest, InspectionQuery
from serving.audit import AuditDep
from serving.auth import scoped
from serving.deps import RECIPE_HEADER, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.requests import FeedbackBody
from serving.schemas import FeedbackResponse, InspectionsResponse, MonitorResponse

router = APIRouter(tags=["monitoring"], dependencies=[error_style("resource")])

MAX_PAGE = 1000


@router.get("/inspections", response_model=InspectionsResponse, dependencies=[scoped("inspect")])
def inspections(
    request: Request,
    ctx: RequestCtx,
    service: ServiceDep,
    recipe_id: Annotated[str | None, Query()] = None,
    role_id: Annotated[str | None, Query()] = None,
    roi_id: Annotated[str | None, Query()] = None,
    model_key: Annotated[str | None, Query()] = None,
    decision: Annotated[str | None, Query()] = None,
    since: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query()] = None,
) -> InspectionsResponse:
    """The recorded ``/infer`` decisions, newest first. Every given filter must match; the recipe filters only when
    ``recipe_id`` (or ``X-Recipe-Id``) is given; ``since`` is an ISO time; ``cursor`` the previous ``next_cursor``."""
    explicit_recipe = bool(recipe_id) or bool(request.headers.get(RECIPE_HEADER))
    query = InspectionQuery(recipe_id=ctx.recipe_id if explicit_recipe else None, role_id=role_id, roi_id=roi_id,
                            model_key=model_key, decision=decision, since=since, limit=limit, cursor=cursor)
    return InspectionsResponse.of(service.inspections(query), ids=ctx.ids())


@router.get("/monitor", response_model=MonitorResponse, dependencies=[scoped("inspect")])
def monitor(ctx: RequestCtx, service: ServiceDep, recipe_id: Annotated[str | None, Query()] = None,
            role_id: Annotated[str | None, Query()] = None, roi_id: Annotated[str | None, Query()] = None,
            ) -> MonitorResponse:
    """Drift of every recorded model against its calibration's reference: per ROI the statistics, ``status``
    (ok | warn | alarm | no_reference | insufficient_data), ``cause`` (lighting | focus | score) and ``since``.
    Every model is evaluated (and its status persisted); the filters only narrow the answer."""
    drifts = [d for d in service.monitor()
              if (recipe_id is None or d.recipe_id == ctx.recipe_id)
              and (role_id is None or d.role_id == role_id) and (roi_id is None or d.roi_id == roi_id)]
    return MonitorResponse.of(drifts, ids=ctx.ids())


@router.post("/feedback", openapi_extra=FeedbackBody.openapi(), response_model=FeedbackResponse,
             dependencies=[scoped("samples")])
def feedback(ctx: RequestCtx, service: ServiceDep, audit: AuditDep,
             body: Annotated[dict[str, Any], Body()]) -> FeedbackResponse:
    """An operator's verdict on a recorded inspection: a false reject becomes an OK sample of its ROI, a confirmed
    or missed defect an NG sample (provenance in the sidecar). 404 when no inspection has that request id."""
    req = FeedbackBody.parse(body)
    region = None
    region_body = req.region_body()
    if region_body is not None:
        box, polygon = region_body.bbox, region_body.polygon
        region = CorrectedRegion(bbox=(box[0], box[1], box[2], box[3]) if box else None,
                                 polygon=tuple((p[0], p[1]) for p in polygon) if polygon else None)
    image = None
    if req.image_base64:
        try:
            image = base64.b64decode(req.image_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInputError("image_base64 is not valid base64") from exc
    # an operator's verdict becomes training data, like an upload: audited
    with audit.event("feedback", inspection_request_id=req.request_id, verdict=req.verdict):
        stored = service.feedback(FeedbackRequest(recipe_id=ctx.recipe_id, request_id=req.request_id,
                                                  verdict=req.verdict, region=region, operator=req.operator,
                                                  comment=req.comment, image=image))
    return FeedbackResponse.of(stored, ids=ctx.ids())
