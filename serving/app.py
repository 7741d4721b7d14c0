"""The FastAPI app: ``create_app`` only assembles (STYLE.md §1); ``uvicorn serving.app:app``.

Module-level ``app = create_app()`` is cheap: it reads no settings and loads no model. Each worker
process builds its ``Settings`` and its one ``InspectionService`` in the lifespan at startup.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from bdi import __version__
from bdi.config import Settings
from bdi.logging import configure_logging, slog
from bdi.service import InspectionService
from bdi.shadow import ShadowScorer, shadow_models_dir
from bdi.sync import RegistryFollower, SyncStatusReader
from bdi.tracking import ApiRunLogger, TrackingConfig
from serving.errors import install_error_handlers
from serving.middleware import RequestContextMiddleware, SettingsCORSMiddleware
from serving.routes import ROUTERS

FIRST_SYNC_WAIT_S = 60.0  # start-up waits this long at most for the first registry sync


class CudaRequiredError(RuntimeError):
    """BDI_REQUIRE_CUDA is on and the extractor did not get a CUDA device."""


def create_app(settings: Settings | None = None, *, service: InspectionService | None = None) -> FastAPI:
    """Build the app. ``settings``/``service`` are for tests and embedding; by default both are
    built at startup (``Settings()`` from the environment, then ``InspectionService.from_settings``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or (service.settings if service is not None else Settings())
        log_file = configure_logging(resolved.log_dir)
        tracking = TrackingConfig.from_settings(resolved)
        follower = _follow_registry(tracking, resolved)
        app.state.registry_status = SyncStatusReader(
            resolved.models_dir, following=follower is not None, alias=tracking.alias,
            interval_s=resolved.registry_sync_interval_s,
        )
        run_logger = (
            ApiRunLogger(tracking, project_root=Path.cwd(), background=True)
            if resolved.mlflow_tracking_uri and service is None
            else None
        )
        hooks = {"on_fit": run_logger.on_fit, "on_calibrate": run_logger.on_calibrate} if run_logger else {}
        svc = service or InspectionService.from_settings(resolved, **hooks)
        shadow = _shadow_scorer(svc, resolved)
        health = svc.health()
        if resolved.require_cuda and not str(health["device"]).startswith("cuda"):
            raise CudaRequiredError(
                f"BDI_REQUIRE_CUDA is set but the feature extractor runs on {health['device']!r}; "
                "set BDI_REQUIRE_CUDA=0 for CPU-only serving"
            )
        app.state.settings = resolved
        app.state.service = svc
        slog(
            "startup",
            cwd=os.getcwd(),
            pid=os.getpid(),
            resolved_log_dir=str(log_file.parent) if log_file else None,
            resolved_log_file=str(log_file) if log_file else None,
            models_dir=str(resolved.models_dir.absolute()),
            device=health["device"],
            model=health["model"],
            weights=health["weights"],
            version=__version__,
            mlflow_tracking_uri=resolved.mlflow_tracking_uri or None,
        )
        try:
            yield
        finally:
            if follower is not None:
                follower.stop()
            if shadow is not None:
                shadow.close()
            if run_logger is not None:
                run_logger.close()

    app = FastAPI(title="BDI inspection backend", version=__version__, lifespan=lifespan)
    # Added inner → outer: the request-id layer wraps CORS, so preflights carry X-Request-Id too.
    app.add_middleware(SettingsCORSMiddleware)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _follow_registry(tracking: TrackingConfig, settings: Settings) -> RegistryFollower | None:
    """With ``BDI_REGISTRY_SYNC_ON_START=1``: sync the registry's alias holders into the models dir now
    (waiting a bounded time) and then every ``BDI_REGISTRY_SYNC_INTERVAL_S`` in a background thread.
    A registry that cannot be reached is reported by /health, never fatal."""
    if not settings.registry_sync_on_start:
        return None
    follower = RegistryFollower(cfg=tracking, project_root=Path.cwd(), models_dir=settings.models_dir,
                                interval_s=settings.registry_sync_interval_s,
                                shadow_alias=settings.registry_shadow_alias)
    follower.start(wait_first_s=FIRST_SYNC_WAIT_S)
    return follower



def _shadow_scorer(service: InspectionService, settings: Settings) -> ShadowScorer | None:
    """With ``BDI_REGISTRY_SHADOW_ALIAS``: score every answered /infer again with that alias's version of
    the model (synced into ``shadow/<alias>``) on a worker thread, and log it (``bdi.shadow``)."""
    alias = settings.registry_shadow_alias
    if not alias:
        return None
    shadow_settings = settings.model_copy(update={"models_dir": shadow_models_dir(settings.models_dir, alias)})
    scorer = ShadowScorer(InspectionService(settings=shadow_settings, extractor=service.extractor), alias=alias)
    service.on_infer = scorer.on_infer
    return scorer


app = create_app()
