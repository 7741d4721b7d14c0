"""GET /inspections (the inspection record, filtered and paged) and GET /monitor (drift per ROI): docs/monitoring.md;
additive routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from bdi.service import InspectionQuery
from serving.deps import RECIPE_HEADER, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.schemas import InspectionsResponse, MonitorResponse

router = APIRouter(tags=["monitoring"], dependencies=[error_style("resource")])

MAX_PAGE = 1000


@router.get("/inspections", response_model=InspectionsResponse)
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


@router.get("/monitor", response_model=MonitorResponse)
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
