"""Pure ASGI middleware: request ids + the ``http`` log line, CORS configured at startup, and the
total request-body cap with its read timeout."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bdi.config import Settings
from bdi.logging import bind_context, slog
from serving.errors import REQUEST_ID_HEADER
from serving.settings import ServingSettings

# docs/design.md "Safe request ids": only short, header- and log-safe ids are echoed.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
EXPOSED_HEADERS = ("x-request-id", "x-recipe-id")


def accept_request_id(raw: str | None) -> str:
    """The client's X-Request-Id when it is safe (≤ 128 of ``[A-Za-z0-9._:-]``), else a new uuid4."""
    if raw and _SAFE_REQUEST_ID.fullmatch(raw):
        return raw
    return str(uuid.uuid4())


class RequestContextMiddleware:
    """Per request: pick the request id, bind it for ``slog``, echo it on every response header,
    and write one ``http`` event (method, path, status_code, elapsed_ms).

    A pure ASGI middleware (not ``BaseHTTPMiddleware``) so the handler runs in the same task and
    sees the bound log context.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accept_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status_code = 500  # what the client gets if the app raises before responding
        started = time.perf_counter()

        async def send_with_request_id(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with bind_context(request_id=request_id, recipe_id=None, role_id=None, roi_id=None):
            try:
                await self.app(scope, receive, send_with_request_id)
            finally:
                recipe = {"recipe_id": state["recipe_id"]} if "recipe_id" in state else {}
                slog(
                    "http",
                    method=scope.get("method", ""),
                    path=scope.get("path", ""),
                    status_code=status_code,
                    elapsed_ms=round((time.perf_counter() - started) * 1e3, 3),
                    **recipe,
                )


def cors_origin_list(cors_origins: str, *, auth_on: bool) -> list[str]:
    """The allowed origins: the list as given, ``*`` when empty; with auth on ``*`` is dropped (no origin
    but the listed ones, none when only ``*`` was given: the server's own page is same-origin)."""
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()] or ["*"]
    return [o for o in origins if o != "*"] if auth_on else origins


def build_cors(app: ASGIApp, cors_origins: str, *, auth_on: bool = False) -> CORSMiddleware:
    """CORS per docs/contract.md "CORS": credentials only when the origin list is not ``*``; never ``*``
    while auth is on (docs/security.md)."""
    origins = cors_origin_list(cors_origins, auth_on=auth_on)
    if auth_on and "*" in cors_origin_list(cors_origins, auth_on=False):
        slog("security.cors_wildcard_dropped", level="warning", origins=origins,
             message="BDI_CORS_ORIGINS '*' is ignored while BDI_AUTH is on: list the origins that may call")
    wildcard = origins == ["*"]
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_credentials=not wildcard,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=list(EXPOSED_HEADERS),
    )


class SettingsCORSMiddleware:
    """CORS whose origins come from the ``ServingSettings`` built in the lifespan.

    ``create_app()`` at import must not read the environment, so the real ``CORSMiddleware`` is
    built on the first request from ``app.state.serving_settings`` (one per app instance).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: CORSMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._cors is None:
            serving_settings: ServingSettings = scope["app"].state.serving_settings
            self._cors = build_cors(self.app, serving_settings.cors_origins, auth_on=serving_settings.auth != "off")
        await self._cors(scope, receive, send)


class RequestTooLargeError(Exception):
    """Raised from ``receive`` once a body grows past the cap (the app must not go on reading)."""


class RequestBodyTimeoutError(Exception):
    """Raised from ``receive`` when the next part of the body does not come in time."""


def too_large_message(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes (BDI_MAX_REQUEST_BYTES)"


def body_timeout_message(timeout_s: float) -> str:
    return f"request body not received: nothing came for {timeout_s:g} s (BDI_BODY_READ_TIMEOUT_S)"


class RequestSizeLimitMiddleware:
    """A total body cap (``Settings.max_request_bytes``) and a body-read timeout
    (``ServingSettings.body_read_timeout_s``) for every route, before the bytes land.

    A declared ``Content-Length`` over the cap is answered 413 before one body byte is read. A body
    that grows past it while streaming (chunked, or a ``Content-Length`` that lies) stops at the cap:
    ``receive`` raises, whatever the app then answers is dropped, and the client gets the 413. So
    Starlette never spools more than the cap to disk or memory. A client that stops sending its body
    (headers, then nothing) is answered 408 the same way once no part of it came for the timeout, and the
    connection is closed. Both bodies are JSON shape B.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        serving_settings: ServingSettings = scope["app"].state.serving_settings
        limit = settings.max_request_bytes
        timeout_s = serving_settings.body_read_timeout_s
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _send_refusal(send, status=413, detail=too_large_message(limit))
            return
        received = 0
        body_done = False
        refusal: tuple[int, str] | None = None  # (status, detail) that replaces the app's answer
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done, refusal
            if refusal is not None:
                raise RequestTooLargeError(refusal[1]) if refusal[0] == 413 else RequestBodyTimeoutError(refusal[1])
            if body_done:  # after the body only a disconnect can come: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout_s)
            except TimeoutError:
                refusal = (408, body_timeout_message(timeout_s))
                raise RequestBodyTimeoutError(refusal[1]) from None
            if message["type"] == "http.request":
                if received + len(message.get("body", b"")) > limit:  # this message is not handed on
                    refusal = (413, too_large_message(limit))
                    raise RequestTooLargeError(refusal[1])
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None and not started:
                return  # the app's answer to the aborted read is replaced by the refusal below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None or started:
                raise
        if refusal is not None and not started:
            if refusal[0] == 413:
                slog("http.request_too_large", accepted_bytes=received, limit_bytes=limit)
            else:
                slog("http.request_body_timeout", accepted_bytes=received, timeout_s=timeout_s)
            await _send_refusal(send, status=refusal[0], detail=refusal[1])


async def _send_refusal(send: Send, *, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
