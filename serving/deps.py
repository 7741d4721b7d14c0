"""Request dependencies, each declared once as an ``Annotated`` alias."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from bdi.config import Settings
from bdi.logging import bind_context
from bdi.mlops.follower import SyncStatusReader
from bdi.refs import DatasetRef, ModelRef, pick_recipe_id
from bdi.service import InspectionService
from serving.metrics.families import Metrics

RECIPE_HEADER = "X-Recipe-Id"
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> InspectionService:
    service: InspectionService = request.app.state.service
    return service


async def get_registry_status(request: Request) -> SyncStatusReader:
    reader: SyncStatusReader = request.app.state.registry_status
    return reader


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[InspectionService, Depends(get_service)]
RegistryStatusDep = Annotated[SyncStatusReader, Depends(get_registry_status)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


@dataclass(frozen=True)
class RequestContext:
    """The ids every response repeats: the request id and the validated recipe id (docs/contract.md "Common rules")."""

    request_id: str
    recipe_id: str

    def ids(self) -> dict[str, str]:
        """``{"request_id", "recipe_id"}`` for a JSON success body."""
        return {"request_id": self.request_id, "recipe_id": self.recipe_id}

    def model_ref(self, *, role_id: str, roi_id: str, model_key: str | None = None) -> ModelRef:
        """The model of this request (model_key defaults to roi_id); also binds role/roi
        into the log context of the calling handler."""
        bind_context(role_id=role_id, roi_id=roi_id)
        return ModelRef.create(recipe_id=self.recipe_id, role_id=role_id, roi_id=roi_id, model_key=model_key)

    def dataset_ref(self, *, role_id: str, roi_id: str) -> DatasetRef:
        """The dataset of this request (datasets ignore model_key); binds role/roi for logs."""
        bind_context(role_id=role_id, roi_id=roi_id)
        return DatasetRef(recipe_id=self.recipe_id, role_id=role_id, roi_id=roi_id)


async def _explicit_recipe_id(request: Request) -> object:
    """``recipe_id`` from the body (form field or JSON key) or else the query string.

    FastAPI has already read and cached the body (``request.form()`` / ``request.json()``) by the
    time dependencies run, so this re-reads nothing from the network.
    """
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    value: object = None
    if request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        if content_type in _FORM_TYPES:
            value = (await request.form()).get("recipe_id")
        elif content_type == "application/json" or content_type.endswith("+json"):
            try:
                body: Any = await request.json()
            except ValueError:
                body = None
            if isinstance(body, Mapping):
                value = body.get("recipe_id")
    if not (isinstance(value, str) and value):
        value = request.query_params.get("recipe_id")
    return value


async def request_context(request: Request) -> RequestContext:
    """Resolve the recipe (docs/contract.md "Recipe id"): body/form/query ``recipe_id`` (a non-empty string) first, then
    ``X-Recipe-Id``, then ``default``. Invalid or reserved ids raise (→ 400 shape C).

    ``async`` on purpose: the log binding must happen in the request's own context so the
    threadpool handler inherits it.
    """
    explicit = await _explicit_recipe_id(request)
    recipe_id = pick_recipe_id(explicit=explicit, header=request.headers.get(RECIPE_HEADER))
    request.state.recipe_id = recipe_id
    bind_context(recipe_id=recipe_id)
    return RequestContext(request_id=str(request.state.request_id), recipe_id=recipe_id)


RequestCtx = Annotated[RequestContext, Depends(request_context)]
