"""GET /inspections: the inspection record, filtered and paged (docs/monitoring.md; additive routes)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from bdi.service import InspectionQuery
from serving.deps import RECIPE_HEADER, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.schemas import InspectionsResponse

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
