"""GET /state and GET /manifest (docs/contract.md): what is fitted/calibrated for one ROI, and its lineage
(an additive field: where the model came from, ``bdi.storage.lineage.lineage_view``); the additive GET /progress:
how far its running fit or calibration is."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from bdi.logging import slog
from serving.auth import scoped
from serving.deps import RequestCtx, ServiceDep
from serving.errors import error_style
from serving.schemas import ManifestResponse, ProgressResponse, StateResponse

router = APIRouter(tags=["state"], dependencies=[error_style("resource"), scoped("inspect")])

IdQ = Annotated[str, Query()]
ModelKeyQ = Annotated[str | None, Query()]


@router.get("/state", response_model=StateResponse)
def state(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, model_key: ModelKeyQ = None
) -> StateResponse:
    """``memory_fitted`` / ``calib_present``; model_key is the raw effective one."""
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    state = service.state(ref)
    slog("state.response", model_key=ref.model_key, memory_fitted=state.memory_fitted,
         calib_present=state.calib_present)
    return StateResponse.of(state, ids=ctx.ids())


@router.get("/manifest", response_model=ManifestResponse)
def manifest(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, model_key: ModelKeyQ = None
) -> ManifestResponse:
    """Memory presence, the full calibration and the dataset listing; model_key is sanitised the legacy
    way (contract M2: ``a b`` → ``a_b``), though the model's folder name is the injective one."""
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    manifest = service.manifest(ref)
    slog("manifest.response", model_key=ref.model_key, has_memory=manifest.memory,
         has_calib=manifest.calib is not None)
    return ManifestResponse.of(manifest, ids=ctx.ids())


@router.get("/progress", response_model=ProgressResponse)
def progress(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, model_key: ModelKeyQ = None
) -> ProgressResponse:
    """The last API fit's or calibration's progress (done/total per stage), whichever worker runs it."""
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    ref_ids = {"recipe_id": ref.recipe_id, "role_id": ref.role_id, "roi_id": ref.roi_id, "model_key": ref.model_key}
    return ProgressResponse.of(service.progress(ref), ref_ids=ref_ids, ids=ctx.ids())
