"""The FastAPI app: ``create_app`` only assembles (STYLE.md §1); ``uvicorn serving.app:app``.

Module-level ``app = create_app()`` is cheap: it reads no settings and loads no model. Each worker
process builds its ``Settings`` and its one ``InspectionService`` in the lifespan at startup.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bdi import __version__
from bdi.config import Settings
from bdi.logging import configure_logging, slog
from bdi.service import InspectionService

from .errors import install_error_handlers
from .middleware import RequestContextMiddleware, SettingsCORSMiddleware
from .routes import ROUTERS


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
        svc = service or InspectionService.from_settings(resolved)
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
        )
        yield

    app = FastAPI(title="BDI inspection backend", version=__version__, lifespan=lifespan)
    # Added inner → outer: the request-id layer wraps CORS, so preflights carry X-Request-Id too.
    app.add_middleware(SettingsCORSMiddleware)
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


app = create_app()
