"""POST /fit_ok (docs/contract.md "POST /fit_ok"): build the PatchCore memory from uploaded images or the OK dataset."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from bdi.logging import slog
from serving.audit import AuditDep
from serving.auth import scoped
from serving.deps import MetricsDep, RequestCtx, ServiceDep
from serving.errors import error_style
from serving.parsing import read_uploads
from serving.schemas import FitResponse

router = APIRouter(tags=["fit"], dependencies=[error_style("model"), scoped("train")])


@router.post("/fit_ok", response_model=FitResponse)
def fit_ok(
    ctx: RequestCtx,
    service: ServiceDep,
    audit: AuditDep,
    metrics: MetricsDep,
    role_id: Annotated[str, Form()],
    roi_id: Annotated[str, Form()],
    mm_per_px: Annotated[float, Form()],
    images: Annotated[list[UploadFile] | None, File()] = None,
    memory_fit: Annotated[bool, Form()] = False,
    use_dataset: Annotated[bool, Form()] = False,
    model_key: Annotated[str | None, Form()] = None,
) -> FitResponse:
    """Fit from repeated ``images`` parts, or from the stored ``ok`` samples with use_dataset=true."""
    started = time.perf_counter()
    ref = ctx.model_ref(role_id=role_id, roi_id=roi_id, model_key=model_key)
    files = [] if use_dataset else read_uploads(images, limits=service.limits)
    slog("fit_ok.request", n_files=len(images or ()), memory_fit=memory_fit, use_dataset=use_dataset,
         mm_per_px=mm_per_px, model_key_raw=model_key, model_key=ref.model_key)
    with audit.change("fit", ref, use_dataset=use_dataset, n_images=len(files)):
        result = service.fit_ok(ref=ref, mm_per_px=mm_per_px, images=files, use_dataset=use_dataset,
                                memory_fit=memory_fit)
    metrics.observe_fit(result=result, source="dataset" if use_dataset else "images",
                        seconds=time.perf_counter() - started)
    slog("fit_ok.response", n_embeddings=result.n_embeddings, coreset_size=result.coreset_size,
         token_shape=list(result.token_shape), n_images=result.n_images, model_key=ref.model_key,
         memory_path_written=str(result.memory_path),
         index_path_written=str(result.index_path) if result.index_path else None,
         timings_ms=result.timings_ms, elapsed_ms=round((time.perf_counter() - started) * 1e3, 3))
    return FitResponse.of(result, ids=ctx.ids())
