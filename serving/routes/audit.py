"""GET /audit (additive, ``admin`` scope): pages through the audit trail (docs/security.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from bdi.security.audit import AuditLog
from serving.auth import scoped
from serving.deps import RequestCtx
from serving.errors import error_style
from serving.schemas import AuditPageResponse

router = APIRouter(tags=["audit"], dependencies=[error_style("resource"), scoped("admin")])

MAX_PAGE = 1000


@router.get("/audit", response_model=AuditPageResponse)
def audit_page(
    request: Request, ctx: RequestCtx,
    after_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> AuditPageResponse:
    """Records with ``seq > after_seq``, oldest first; ``next_after_seq`` is the value to ask for the next
    page (null at the end). ``bdi audit verify`` checks the chain."""
    log: AuditLog = request.app.state.audit_log
    records, next_after = log.page(after_seq=after_seq, limit=limit)
    return AuditPageResponse(records=records, next_after_seq=next_after, **ctx.ids())
