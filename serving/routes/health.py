"""GET /health (§2.1): O(1), no disk I/O; polled by the GUI every 2 s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from bdi import __version__
from serving.deps import RequestCtx, ServiceDep
from serving.errors import error_style

router = APIRouter(tags=["health"], dependencies=[error_style("resource")])


@router.get("/health")
async def health(request: Request, ctx: RequestCtx, service: ServiceDep) -> dict[str, Any]:
    """Status, device, backbone name and version, which weights are loaded, and whether the MLflow
    registry answers (``registry``: disabled | checking | ok | unreachable, as last seen).

    ``async``: it touches no disk and no network, and must answer even when every worker thread is
    busy fitting.
    """
    info = service.health()
    device = str(info["device"]).split(":", 1)[0]  # "cuda:0" → "cuda" (the GUI shows it verbatim)
    body: dict[str, Any] = {
        "status": "ok",
        "device": device,
        "model": info["model"],
        "version": __version__,
        **ctx.ids(),
    }
    if not info["cuda_available"]:
        body["reason"] = "cuda_not_available"
    body["weights"] = info["weights"]
    body["pretrained"] = bool(info["pretrained"])
    status = getattr(request.app.state, "tracking_status", None)
    body["registry"] = status.state if status is not None else "disabled"
    return body
