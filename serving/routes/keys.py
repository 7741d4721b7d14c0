"""Key management over HTTP (additive, ``admin`` scope): GET /keys, POST /keys (the token is in this answer
only), DELETE /keys/{key_id}; each change in the audit trail, as ``bdi keys`` does (docs/security.md). Refused
(403) while ``BDI_AUTH`` is off."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request

from bdi.security.keys import KeyStore, parse_scopes
from serving.audit import AuditDep
from serving.auth import AuthRefusedError, scoped
from serving.deps import RequestCtx
from serving.errors import error_style
from serving.requests import KeyCreateRequest
from serving.schemas import KeyCreatedResponse, KeyListResponse, KeyRevokedResponse


async def _refused_while_auth_is_off(request: Request) -> None:
    # with auth off anyone could mint a key today that opens the server once auth is turned on
    if request.app.state.serving_settings.auth == "off":
        raise AuthRefusedError(403, "key management over HTTP needs BDI_AUTH on; use `bdi keys` on the server")


router = APIRouter(tags=["keys"], dependencies=[error_style("resource"), scoped("admin"),
                                                Depends(_refused_while_auth_is_off)])


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.key_store
    return store


@router.get("/keys", response_model=KeyListResponse)
def list_keys(request: Request, ctx: RequestCtx) -> KeyListResponse:
    """Every key's id, label, scopes, creation, expiry and revocation time; never a token or hash."""
    return KeyListResponse(keys=[k.public() for k in _store(request).keys().values()], **ctx.ids())


@router.post("/keys", response_model=KeyCreatedResponse, openapi_extra=KeyCreateRequest.openapi())
def create_key(request: Request, ctx: RequestCtx, audit: AuditDep,
               body: Annotated[dict[str, Any], Body()]) -> KeyCreatedResponse:
    """A new key; its ``token`` is shown in this answer only (the server keeps a salted hash)."""
    req = KeyCreateRequest.parse(body)
    expires = timedelta(days=req.expires_days) if req.expires_days is not None else None
    with audit.event("keys.create") as detail:
        created = _store(request).create(label=req.label, scopes=parse_scopes(req.scopes), expires_in=expires)
        detail.update(created.key.public())
    return KeyCreatedResponse(**created.key.public(), token=created.token, **ctx.ids())


@router.delete("/keys/{key_id}", response_model=KeyRevokedResponse)
def revoke_key(request: Request, ctx: RequestCtx, audit: AuditDep, key_id: str) -> KeyRevokedResponse:
    """Revoke a key: every worker refuses it at its next request (404 B for an unknown id)."""
    with audit.event("keys.revoke", key=key_id) as detail:
        revoked = _store(request).revoke(key_id)
        detail.update(revoked.public())
    return KeyRevokedResponse(**revoked.public(), **ctx.ids())
