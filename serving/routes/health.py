"""GET /health (§2.1): O(1), polled by the GUI every 2 s; its only disk access is a stat of the registry
sync status file."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from bdi import __version__
from serving.deps import RegistryStatusDep, RequestCtx, ServiceDep
from serving.errors import error_style

router = APIRouter(tags=["health"], dependencies=[error_style("resource")])


@router.get("/health")
async def health(ctx: RequestCtx, service: ServiceDep, registry: RegistryStatusDep) -> dict[str, Any]:
    """Status, device, backbone name and version, plus which weights are loaded and the registry view
    (how stale it is, the versions synced; ``bdi.sync.SyncStatusReader``).

    ``async``: it must answer even when every worker thread is busy fitting; its only disk access is a
    stat of the small sync status file (re-read when it changed).
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
    body["registry"] = registry.health()
    return body
