"""Dataset sample endpoints (docs/contract.md "Endpoints"): upload, list, download, meta, delete, clear."""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from bdi.logging import slog
from serving.audit import AuditDep
from serving.auth import scoped
from serving.deps import RequestCtx, ServiceDep
from serving.errors import error_style
from serving.parsing import read_uploads
from serving.schemas import ClearResponse, DatasetListResponse, DeleteResponse, SampleMetaResponse, UploadResponse

router = APIRouter(prefix="/datasets", tags=["datasets"], dependencies=[error_style("resource")])

IdQ = Annotated[str, Query()]
LabelQ = Annotated[str, Query()]
FilenameQ = Annotated[str, Query()]


def _add_upload_route(label: str) -> None:
    """Register ``POST /datasets/<label>/upload`` (route name ``upload_<label>``) for one sample class."""

    def upload(
        ctx: RequestCtx,
        service: ServiceDep,
        audit: AuditDep,
        role_id: Annotated[str, Form()],
        roi_id: Annotated[str, Form()],
        images: Annotated[list[UploadFile], File()],
        metas: Annotated[list[str] | None, Form()] = None,
    ) -> dict[str, Any]:
        ref = ctx.dataset_ref(role_id=role_id, roi_id=roi_id)
        slog("datasets.upload.request", label=label, n_files=len(images), n_metas=len(metas or ()))
        files = read_uploads(images, limits=service.limits)
        with audit.change("samples.upload", ref, label=label) as detail:
            saved = service.samples.upload(ref=ref, label=label, files=files, metas=metas)
            detail["saved"] = saved
        slog("datasets.upload.response", label=label, saved=saved)
        return {"status": "ok", "saved": saved, **ctx.ids()}

    upload.__name__ = upload.__qualname__ = f"upload_{label}"
    upload.__doc__ = f"Store {label.upper()} samples; ``metas[i]`` (JSON object text) is image i's sidecar meta."
    router.post(f"/{label}/upload", response_model=UploadResponse, dependencies=[scoped("samples")])(upload)


for _label in ("ok", "ng"):
    _add_upload_route(_label)


@router.get("/list", response_model=DatasetListResponse, dependencies=[scoped("inspect")])
def list_samples(ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ) -> dict[str, Any]:
    """Stored images per class (a class key only when its folder exists) and sidecar presence."""
    listing = service.samples.listing(ctx.dataset_ref(role_id=role_id, roi_id=roi_id))
    slog("datasets.list.response",
         class_counts={label: cls["count"] for label, cls in listing["classes"].items()})
    return {**listing, **ctx.ids()}


IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/x-ms-bmp", "image/webp",
                     "application/octet-stream")


@router.get("/file", response_class=Response, dependencies=[scoped("inspect")],
            responses={200: {"description": "The stored image bytes",
                             "content": {media: {} for media in IMAGE_MEDIA_TYPES}}})
def download_sample(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, label: LabelQ, filename: FilenameQ
) -> Response:
    """The raw image bytes (only the basename of ``filename`` is used)."""
    ref = ctx.dataset_ref(role_id=role_id, roi_id=roi_id)
    name, data = service.samples.read(ref=ref, label=label, filename=filename)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    quoted = quote(name)
    disposition = (f'attachment; filename="{name}"' if quoted == name
                   else f"attachment; filename*=utf-8''{quoted}")
    return Response(content=data, media_type=media_type, headers={"Content-Disposition": disposition})


@router.get("/meta", response_model=SampleMetaResponse, dependencies=[scoped("inspect")])
def sample_meta(
    ctx: RequestCtx, service: ServiceDep, role_id: IdQ, roi_id: IdQ, label: LabelQ, filename: FilenameQ
) -> dict[str, Any]:
    """The sidecar object; request_id/recipe_id are added only when the sidecar lacks them."""
    meta = service.samples.meta(ref=ctx.dataset_ref(role_id=role_id, roi_id=roi_id), label=label,
                                filename=filename)
    return {**ctx.ids(), **meta}


@router.delete("/file", response_model=DeleteResponse, dependencies=[scoped("samples")])
def delete_sample(
    ctx: RequestCtx, service: ServiceDep, audit: AuditDep, role_id: IdQ, roi_id: IdQ, label: LabelQ, filename: FilenameQ
) -> dict[str, Any]:
    """Delete one image and its sidecar; ``deleted`` says whether the image existed."""
    ref = ctx.dataset_ref(role_id=role_id, roi_id=roi_id)
    with audit.change("samples.delete", ref, label=label, filename=filename) as detail:
        deleted = service.samples.delete(ref=ref, label=label, filename=filename)
        detail["deleted"] = deleted
    slog("datasets.delete", label=label, filename=filename, deleted=deleted)
    return {"deleted": deleted, "filename": filename, **ctx.ids()}


@router.delete("/clear", response_model=ClearResponse, dependencies=[scoped("samples")])
def clear_samples(
    ctx: RequestCtx, service: ServiceDep, audit: AuditDep, role_id: IdQ, roi_id: IdQ, label: LabelQ
) -> dict[str, Any]:
    """Delete every file of one class (images and sidecars); ``cleared`` counts them all and
    ``resolved_recipe_id`` names the recipe whose folder it was (additive; docs/design.md "Deletes stay in their
    recipe")."""
    ref = ctx.dataset_ref(role_id=role_id, roi_id=roi_id)
    with audit.change("samples.clear", ref, label=label) as detail:
        result = service.samples.clear(ref=ref, label=label)
        detail["cleared"] = result.cleared
    slog("datasets.clear", label=label, cleared=result.cleared, resolved_recipe_id=result.resolved_recipe_id)
    return {"cleared": result.cleared, "label": label, "resolved_recipe_id": result.resolved_recipe_id,
            **ctx.ids()}
