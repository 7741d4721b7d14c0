"""The request counter: a pure ASGI middleware (outermost) that counts and times every HTTP response by route
template, method and status (docs/metrics.md)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics.families import Metrics

UNMATCHED_ROUTE = "unmatched"  # every path no route template matches (404s): one label value, not one per path
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"  # any other method a client sends


def method_label(scope: Scope) -> str:
    """The request method, or :data:`OTHER_METHOD` when it is not a standard one (labels stay few)."""
    method = str(scope.get("method", "")).upper()
    return method if method in KNOWN_METHODS else OTHER_METHOD


def route_template(scope: Scope) -> str:
    """The path template of the route that handled ``scope`` (``/datasets/file``), set by the router; else
    :data:`UNMATCHED_ROUTE`."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


class HttpMetricsMiddleware:
    """Counts (``bdi_http_requests_total``) and times (``bdi_http_request_duration_seconds``) each response,
    with ``bdi_http_requests_in_progress`` meanwhile; the instruments are the app's ``state.metrics`` (built in
    the lifespan). A request that fails before responding counts as 500, what the client gets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics: Metrics | None = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        status_code = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        metrics.http_in_progress.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            metrics.http_in_progress.dec()
            metrics.observe_request(route=route_template(scope), method=method_label(scope),
                                    status=status_code, seconds=time.perf_counter() - started)
