"""GET /health (§2.1): O(1), no disk I/O; polled by the GUI every 2 s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from bdi import __version__
from serving.deps import RequestCtx, ServiceDep
from serving.errors import error_style

router = APIRouter(tags=["health"], dependencies=[error_style("resource")])


@router.get("/health")
async def health(ctx: RequestCtx, service: ServiceDep) -> dict[str, Any]:
    """Status, device, backbone name and version, plus which weights are loaded and what runs the net
    (``runtime``; ``runtime_fallback`` says why the requested one is not used).

    ``async``: it touches no disk and must answer even when every worker thread is busy fitting.
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
    for key in ("runtime", "runtime_requested", "runtime_fallback", "runtime_parity"):
        body[key] = info[key]
    return body
