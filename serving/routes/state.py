"""GET /state and GET /manifest (docs/contract.md): what is fitted/calibrated for one ROI, and its lineage
(an additive field: where the model came from, ``bdi.storage.lineage.lineage_view``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from bdi.logging import slog
from serving.deps import RequestCtx, ServiceDep
from serving.errors import error_style
from serving.schemas import ManifestResponse, StateResponse

router = APIRouter(tags=["state"], dependencies=[error_style("resource")])

IdQ = Annotated[str, Query()]
ModelKeyQ = Annotated[str | None, Query()]


@router.get("/state", response_model=StateResponse)
def state(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, model_key: ModelKeyQ = None
) -> dict[str, Any]:
    """``memory_fitted`` / ``calib_present``; model_key is the raw effective one."""
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    flags = service.state(ref)
    slog("state.response", model_key=ref.model_key, memory_fitted=flags["memory_fitted"],
         calib_present=flags["calib_present"])
    return {
        "status": "ok",
        "memory_fitted": flags["memory_fitted"],
        "calib_present": flags["calib_present"],
        **ctx.ids(),
        "role_id": ref.role_id,
        "roi_id": ref.roi_id,
        "model_key": ref.model_key,
        "lineage": flags["lineage"],
    }


@router.get("/manifest", response_model=ManifestResponse)
def manifest(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, model_key: ModelKeyQ = None
) -> dict[str, Any]:
    """Memory presence, the full calibration and the dataset listing; model_key is sanitised the legacy
    way (contract M2: ``a b`` → ``a_b``), though the model's folder name is the injective one."""
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    info = service.manifest(ref)
    slog("manifest.response", model_key=ref.model_key, has_memory=info["memory"],
         has_calib=info["calib"] is not None)
    return {
        "role_id": ref.role_id,
        "roi_id": ref.roi_id,
        "recipe_id": ctx.recipe_id,
        "model_key": ref.model_key_legacy,
        "memory": info["memory"],
        "calib": info["calib"],
        "datasets": info["datasets"],
        "request_id": ctx.request_id,
        "lineage": info["lineage"],
    }
