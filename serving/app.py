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
from bdi.errors import BDIError
from bdi.logging import configure_logging, slog
from bdi.registry import sync_registered
from bdi.service import InspectionService
from bdi.tracking import ApiRunLogger, TrackingConfig
from serving.errors import install_error_handlers
from serving.middleware import RequestContextMiddleware, SettingsCORSMiddleware
from serving.routes import ROUTERS


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
        if resolved.registry_sync_on_start:
            _sync_registry(tracking, resolved)
        run_logger = (
            ApiRunLogger(tracking, project_root=Path.cwd(), background=True)
            if resolved.mlflow_tracking_uri and service is None
            else None
        )
        hooks = {"on_fit": run_logger.on_fit, "on_calibrate": run_logger.on_calibrate} if run_logger else {}
        svc = service or InspectionService.from_settings(resolved, **hooks)
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
            runtime=health["runtime"],
            runtime_fallback=health["runtime_fallback"],
            version=__version__,
            mlflow_tracking_uri=resolved.mlflow_tracking_uri or None,
        )
        try:
            yield
        finally:
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


def _sync_registry(tracking: TrackingConfig, settings: Settings) -> None:
    """Materialise the registered models holding the alias; a failure is logged, not fatal."""
    try:
        synced = sync_registered(cfg=tracking, project_root=Path.cwd(), models_dir=settings.models_dir,
                                 exports_root=settings.exports_dir())
        slog("registry.sync", synced=[f"{m.name}@{m.version}" for m in synced])
    except BDIError as exc:
        slog("registry.sync_failed", error=str(exc))


app = create_app()
