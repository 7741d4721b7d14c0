"""Access control (docs/security.md): each route declares the scope it needs with :func:`scoped`, and
:class:`AuthMiddleware` checks the request's API key against it before the app reads one body byte.

``BDI_AUTH`` (``ServingSettings.auth``): ``off`` (the default: every request is ``anonymous``, as the legacy
GUI expects), ``required`` (every route but the page's static files needs a key holding its scope) or
``writes`` (the ``inspect`` routes stay open; the others need a key). A key comes as ``Authorization:
Bearer <token>`` or ``X-API-Key: <token>``. No valid key → 401, a key without the scope → 403, too many
failures from one client address → 429, all in the contract's shape B (``{"detail": str}``).

The scope is a FastAPI dependency, so it is visible in the route table (a test checks that every route has
one) and is checked again once the route runs; the middleware is what makes it act before the body:
FastAPI reads and validates a body before it solves dependencies.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from bdi.errors import BDIError
from bdi.logging import slog
from bdi.security.keys import KeyStore, Principal
from serving.settings import ServingSettings

RouteScope = Literal["inspect", "samples", "train", "admin", "public"]
AuthMode = Literal["off", "required", "writes"]
SCOPE_ATTR = "bdi_scope"
FAILURE_WINDOW_S = 60.0


class AuthRefusedError(Exception):
    """A request the key check refuses (raised by the route dependency; the middleware answers directly)."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def scoped(scope: RouteScope) -> Any:
    """The dependency a router (or one route) declares: which scope its requests need."""

    async def require_scope(request: Request) -> None:
        principal = request.scope.get("state", {}).get("principal")
        settings: ServingSettings = request.app.state.serving_settings
        if principal is None:  # the middleware did not run (an embedded app): decide here
            keys: KeyStore = request.app.state.key_store
            decision = decide(mode=settings.auth, scope=scope, headers=request.headers, keys=keys)
            if isinstance(decision, AuthRefusedError):
                raise decision
            request.state.principal = decision
        elif not allows(settings.auth, scope=scope, principal=principal):
            raise AuthRefusedError(403, _forbidden(scope))

    setattr(require_scope, SCOPE_ATTR, scope)
    return Depends(require_scope)


def route_scope(route: BaseRoute) -> RouteScope | None:
    """The scope a route declared with :func:`scoped` (router- or route-level), None when it declared none."""
    dependant = getattr(route, "dependant", None)
    for dep in getattr(dependant, "dependencies", ()):
        found = getattr(dep.call, SCOPE_ATTR, None)
        if found is not None:
            return found  # type: ignore[no-any-return]
    return None


def allows(mode: AuthMode, *, scope: RouteScope, principal: Principal) -> bool:
    if mode == "off" or scope == "public" or (mode == "writes" and scope == "inspect"):
        return True
    return scope in principal.scopes


def presented_token(headers: Headers) -> str | None:
    """The key of ``Authorization: Bearer …`` or ``X-API-Key``."""
    auth = headers.get("authorization", "")
    kind, _, value = auth.partition(" ")
    if kind.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


def _forbidden(scope: str) -> str:
    return f"this API key lacks the '{scope}' scope this route needs"


UNAUTHORIZED = ("a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>); "
                "create one with `bdi keys create`")


def decide(*, mode: AuthMode, scope: RouteScope, headers: Headers, keys: KeyStore) -> Principal | AuthRefusedError:
    """The principal a request acts as, or why it is refused (401 no valid key, 403 scope missing)."""
    token = presented_token(headers)
    if mode == "off" or scope == "public" or (mode == "writes" and scope == "inspect" and token is None):
        return Principal.anonymous()
    principal = keys.authenticate(token) if token else None
    if principal is None:
        return AuthRefusedError(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    if not allows(mode, scope=scope, principal=principal):
        return AuthRefusedError(403, _forbidden(scope))
    return principal


class FailureLimiter:
    """Failed key attempts per client address in a sliding window, in this process (docs/security.md: with N
    workers a client gets at most N × the limit before every worker refuses it)."""

    MAX_CLIENTS = 10_000

    def __init__(self, max_failures: int, window_s: float = FAILURE_WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}

    def retry_after_s(self, client: str, now: float | None = None) -> int:
        """Seconds until ``client`` may try again; 0 when it may now."""
        moment = time.monotonic() if now is None else now
        failures = self._failures.get(client)
        if not failures:
            return 0
        while failures and failures[0] <= moment - self.window_s:
            failures.popleft()
        if len(failures) < self.max_failures:
            return 0
        return max(1, int(failures[0] + self.window_s - moment + 0.999))

    def record(self, client: str, now: float | None = None) -> None:
        if len(self._failures) >= self.MAX_CLIENTS:
            self._failures.clear()  # bounded memory; a flood from many addresses is nginx's job
        self._failures.setdefault(client, deque()).append(time.monotonic() if now is None else now)


class AuthMiddleware:
    """Find the route a request goes to (of ``routes``: the routers' own, which carry their router's
    dependencies), and refuse it before its body is read when the key does not open
    the route's scope (see the module docstring). Unknown paths and methods go on to the router (404/405)."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._scopes = [(route, route_scope(route)) for route in routes]
        self._limiter: FailureLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        settings: ServingSettings = app.state.serving_settings
        state = scope.setdefault("state", {})
        if settings.auth == "off":
            state["principal"] = Principal.anonymous()
            await self.app(scope, receive, send)
            return
        route_scope_ = self._route_scope(scope)
        if route_scope_ is None:  # no route: the router answers 404/405
            await self.app(scope, receive, send)
            return
        if self._limiter is None:
            self._limiter = FailureLimiter(settings.auth_max_failures)
        client = client_address(scope)
        wait_s = self._limiter.retry_after_s(client)
        if wait_s:
            slog("auth.rate_limited", client=client, retry_after_s=wait_s)
            await _refuse(send, AuthRefusedError(429, f"too many failed API key attempts from {client}; "
                                                      f"retry in {wait_s} s", headers={"Retry-After": str(wait_s)}))
            return
        try:
            decision = decide(mode=settings.auth, scope=route_scope_, headers=Headers(scope=scope),
                              keys=app.state.key_store)
        except BDIError as exc:  # an unreadable key file: nobody can be checked, and the answer stays JSON
            slog("auth.key_store_error", error=str(exc))
            request_id = str(state.get("request_id", ""))
            message = ("Internal Server Error (the API key file cannot be read; details are in the server log "
                       f"under request_id {request_id})")
            await _send_json(send, status=500,
                             content={"error": message, "request_id": request_id, "recipe_id": "default"})
            return
        if isinstance(decision, AuthRefusedError):
            if decision.status == 401:
                self._limiter.record(client)
            slog("auth.refused", status_code=decision.status, client=client, path=scope.get("path", ""),
                 scope=route_scope_)
            await _refuse(send, decision)
            return
        state["principal"] = decision
        await self.app(scope, receive, send)

    def _route_scope(self, scope: Scope) -> RouteScope | None:
        for route, declared in self._scopes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return declared or "admin"  # a route that declared nothing is closed (a test forbids it)
        return None  # no route, or the wrong method (PARTIAL): the router's 404/405, no key needed


def client_address(scope: Scope) -> str:
    """The client's address (uvicorn already replaced it with X-Forwarded-For's when the peer is a trusted
    proxy, ``BDI_TRUSTED_PROXIES``)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def _refuse(send: Send, refusal: AuthRefusedError) -> None:
    await _send_json(send, status=refusal.status, content={"detail": refusal.detail}, extra=refusal.headers)


async def _send_json(send: Send, *, status: int, content: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    body = json.dumps(content).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
