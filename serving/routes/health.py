"""GET /health (docs/contract.md "GET /health"): O(1), polled by the GUI every 2 s; its only disk accesses are
stats of the registry sync status file, the calibration alerts file and the drift state file (each re-read only
when it changed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from bdi import __version__
from serving.auth import scoped
from serving.deps import RegistryStatusDep, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.schemas import HealthResponse

router = APIRouter(tags=["health"], dependencies=[error_style("resource"), scoped("inspect")])


@router.get("/health", response_model=HealthResponse, response_model_exclude_unset=True)
async def health(
    request: Request, ctx: RequestCtx, service: ServiceDep, registry: RegistryStatusDep
) -> dict[str, Any]:
    """Status, device, backbone name and version, which weights are loaded, and the registry view:
    ``registry.state`` says whether the MLflow tracking server answers (disabled | checking | ok |
    unreachable, as last seen), the rest how stale the synced view is and which versions are synced
    (``bdi.mlops.follower.SyncStatusReader``).

    ``calibration_warnings`` lists the stored calibrations whose threshold detects no NG sample
    (``bdi.storage.alerts``); ``warnings`` the models whose drift is in alarm (docs/monitoring.md, as last
    evaluated); ``runtime_choice`` where the runtime was chosen for every worker.

    ``async``: it touches no network and must answer even when every worker thread is busy fitting; its
    only disk accesses are stats of three small files (each re-read when it changed).
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
    body["backbone"] = info["backbone"]
    body["weights"] = info["weights"]
    body["pretrained"] = bool(info["pretrained"])
    status = getattr(request.app.state, "tracking_status", None)
    body["registry"] = {**registry.health(), "state": status.state if status is not None else "disabled"}
    for key in ("runtime", "runtime_precision", "runtime_requested", "runtime_fallback", "runtime_parity",
                "runtime_choice", "runtime_precision_choice", "calibration_warnings", "warnings"):
        body[key] = info[key]
    body["auth"] = request.app.state.serving_settings.auth
    return body
