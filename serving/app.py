"""The FastAPI app: ``create_app`` only assembles the app; ``uvicorn serving.app:app``.

Module-level ``app = create_app()`` is cheap: it reads no settings and loads no model. Each worker
process builds its ``Settings`` and its one ``InspectionService`` in the lifespan at startup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bdi import __version__
from bdi.config import Settings
from bdi.logging import configure_logging, slog
from bdi.mlops.api_runs import ApiRunLogger
from bdi.mlops.follower import RegistryFollower, SyncStatusReader, preload_mlflow
from bdi.mlops.outages import TrackingStatus, bounded_mlflow_http, check_tracking_server, reap_orphaned_runs
from bdi.mlops.shadow import ShadowScorer, shadow_models_dir
from bdi.mlops.tracking import TrackingConfig, TrackingTarget
from bdi.security.audit import AuditLog
from bdi.security.keys import KeyStore
from bdi.service import InspectionService, metrics_rows, remove_orphan_files
from serving.auth import AuthMiddleware
from serving.errors import ERROR_RESPONSES, install_error_handlers
from serving.metrics.exposition import ScrapeCollectors, drift_families, registry_sync_families
from serving.metrics.families import Metrics
from serving.metrics.folder import use_folder, worker_exits
from serving.metrics.http import HttpMetricsMiddleware
from serving.middleware import RequestContextMiddleware, RequestSizeLimitMiddleware, SettingsCORSMiddleware
from serving.routes import ROUTERS
from serving.settings import ServingSettings

FIRST_SYNC_WAIT_S = 60.0  # start-up waits this long at most for the first registry sync


class CudaRequiredError(RuntimeError):
    """BDI_REQUIRE_CUDA is on and the extractor did not get a CUDA device."""


def create_app(
    settings: Settings | None = None, *, service: InspectionService | None = None,
    serving_settings: ServingSettings | None = None,
) -> FastAPI:
    """Build the app. ``settings``/``service``/``serving_settings`` are for tests and embedding; by default
    they are built at startup (``Settings()`` and ``ServingSettings()`` from the environment, then
    ``InspectionService.from_settings``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or (service.settings if service is not None else Settings())
        resolved_serving = serving_settings or ServingSettings()
        log_file = configure_logging(resolved.log_dir)
        orphans = remove_orphan_files(resolved)
        if orphans:
            slog("startup.orphan_temp_files_removed", count=len(orphans), paths=[str(p) for p in orphans[:20]])
        async with AsyncExitStack() as stack:
            metrics = _start_metrics(app, stack, resolved_serving)
            if resolved.mlflow_tracking_uri or resolved.registry_sync_on_start:
                await asyncio.to_thread(preload_mlflow)  # before any MLflow thread starts (bdi.mlops.follower)
            tracking = TrackingConfig.from_settings(resolved).resolve(Path.cwd())
            status, run_logger = await _start_tracking(stack, resolved, tracking=tracking,
                                                       log_api_runs=service is None)
            follower = await _follow_registry(tracking, resolved, audit=AuditLog(resolved.security_root()))
            if follower is not None:
                stack.callback(follower.stop)
            app.state.registry_status = SyncStatusReader(
                resolved.models_dir, following=follower is not None, alias=tracking.alias,
                interval_s=resolved.registry_sync_interval_s,
            )
            hooks: dict[str, Any] = {"on_cache_event": metrics.on_cache_event}
            if run_logger is not None:
                hooks.update(on_fit=run_logger.on_fit, on_calibrate=run_logger.on_calibrate)
            svc = service or InspectionService.from_settings(resolved, **hooks)
            shadow = _shadow_scorer(svc, resolved)
            if shadow is not None:
                stack.callback(shadow.close)
            health = svc.health()
            if resolved.require_cuda and not str(health["device"]).startswith("cuda"):
                raise CudaRequiredError(
                    f"BDI_REQUIRE_CUDA is set but the feature extractor runs on {health['device']!r}; "
                    "set BDI_REQUIRE_CUDA=0 for CPU-only serving"
                )
            app.state.settings = resolved
            app.state.serving_settings = resolved_serving
            app.state.key_store = KeyStore(resolved.security_root())
            app.state.audit_log = AuditLog(resolved.security_root())
            _warn_about_access(resolved_serving, app.state.key_store)
            app.state.service = svc
            app.state.tracking_status = status
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
            yield

    # An explicit JSONResponse: response models are validated, then rendered by json.dumps as before (not
    # by pydantic's JSON encoder, which spells some floats differently), so the bodies keep their bytes.
    app = FastAPI(title="BDI inspection backend", version=__version__, lifespan=lifespan,
                  default_response_class=JSONResponse)
    # Added inner → outer: the request-id layer wraps CORS, so preflights carry X-Request-Id too;
    # the key check comes before the body cap, so an unauthenticated upload is refused before its bytes;
    # the body cap is innermost, so a 413 carries both.
    app.add_middleware(RequestSizeLimitMiddleware)
    # inside CORS: a refusal carries CORS headers and a preflight needs no key
    app.add_middleware(AuthMiddleware, routes=[route for router in ROUTERS for route in router.routes])
    app.add_middleware(SettingsCORSMiddleware)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(HttpMetricsMiddleware)  # outermost: counts every answer, 413s and CORS preflights too
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router, responses=ERROR_RESPONSES)
    return app


def _start_metrics(app: FastAPI, stack: AsyncExitStack, serving_settings: ServingSettings) -> Metrics:
    """This worker's instruments in the launch's multiprocess folder (``BDI_METRICS_DIR``, docs/metrics.md), and
    the families ``GET /metrics`` reads at scrape time (the registry sync state and drift per ROI, read by the
    route's worker)."""
    folder = use_folder(serving_settings.metrics_base())
    stack.callback(worker_exits, folder)
    metrics = Metrics()
    scraped = ScrapeCollectors()
    scraped.add(lambda: registry_sync_families(app.state.registry_status.health()))
    # drift per ROI, evaluated at scrape time from the shared record and state files (docs/monitoring.md)
    scraped.add(lambda: drift_families(metrics_rows(app.state.service.monitor())))
    app.state.metrics, app.state.metrics_folder, app.state.scrape_collectors = metrics, folder, scraped
    return metrics


async def _start_tracking(
    stack: AsyncExitStack, settings: Settings, *, tracking: TrackingTarget, log_api_runs: bool
) -> tuple[TrackingStatus, ApiRunLogger | None]:
    """Bound every MLflow call of the process, start the start-up work against MLflow on a thread and
    build the API run logger.
    What must be undone at shutdown goes on ``stack``: the logger's bounded close, then the timeouts."""
    uses_mlflow = bool(settings.mlflow_tracking_uri) or settings.registry_sync_on_start
    status = TrackingStatus("checking" if uses_mlflow else "disabled")
    stack.enter_context(bounded_mlflow_http(settings.mlflow_timeout_s))
    if uses_mlflow:
        # MLflow was imported by the lifespan (bdi.mlops.follower.preload_mlflow) before this first MLflow thread
        startup = threading.Thread(target=_registry_startup, args=(tracking, settings, status),
                                   name="bdi-registry-startup", daemon=True)
        startup.start()
    if not (settings.mlflow_tracking_uri and log_api_runs):
        return status, None
    run_logger = ApiRunLogger(tracking, background=True,
                              queue_size=settings.mlflow_queue_size, status=status)
    stack.push_async_callback(asyncio.to_thread, run_logger.close, settings.mlflow_shutdown_timeout_s)
    return status, run_logger


def _registry_startup(tracking: TrackingTarget, settings: Settings, status: TrackingStatus) -> None:
    """Start-up work against MLflow, on a thread: check the tracking server, then mark KILLED the runs a
    killed process left RUNNING (syncing the registry is the follower's job, ``_follow_registry``). Each
    call has the ``BDI_MLFLOW_TIMEOUT_S`` timeout; a failure is logged and reported by /health
    (``registry.state: unreachable``), never fatal."""
    try:
        check_tracking_server(tracking)
        reaped = reap_orphaned_runs(tracking)
        if reaped:
            slog("tracking.runs_reaped", run_ids=reaped, status="KILLED")
        status.set("ok")
    except Exception as exc:  # noqa: BLE001 - an unreachable registry must not stop the server
        slog("registry.unreachable", error=f"{type(exc).__name__}: {exc}"[:500])
        status.set("unreachable", error=f"{type(exc).__name__}: {exc}"[:300])


async def _follow_registry(
    tracking: TrackingTarget, settings: Settings, *, audit: AuditLog
) -> RegistryFollower | None:
    """With ``BDI_REGISTRY_SYNC_ON_START=1``: sync the registry's alias holders into the models dir now
    (waiting a bounded time, off the event loop) and then every ``BDI_REGISTRY_SYNC_INTERVAL_S`` in a
    background thread. A registry that cannot be reached is reported by /health, never fatal."""
    if not settings.registry_sync_on_start:
        return None
    follower = RegistryFollower(tracking=tracking, models_dir=settings.models_dir,
                                interval_s=settings.registry_sync_interval_s, exports_root=settings.exports_dir(),
                                shadow_alias=settings.registry_shadow_alias, audit=audit)
    await asyncio.to_thread(follower.start, wait_first_s=FIRST_SYNC_WAIT_S)
    return follower



def _warn_about_access(serving: ServingSettings, keys: KeyStore) -> None:
    """Start-up warnings a plant's IT must see: auth off on an address beyond loopback, auth on without keys."""
    if serving.auth == "off" and serving.listens_beyond_loopback():
        message = (f"ACCESS CONTROL IS OFF and the server listens on {serving.backend_host}: anyone who reaches "
                   "the port can upload, refit and recalibrate. Set BDI_AUTH=required (docs/security.md)")
        logging.getLogger("uvicorn.error").warning(message)
        slog("security.auth_off", level="warning", host=serving.backend_host, message=message)
    elif serving.auth != "off" and not keys.keys():
        slog("security.no_keys", level="warning", auth=serving.auth, key_file=str(keys.path),
             message="auth is on and no API key exists yet: create one with `bdi keys create`")


def _shadow_scorer(service: InspectionService, settings: Settings) -> ShadowScorer | None:
    """With ``BDI_REGISTRY_SHADOW_ALIAS``: score every answered /infer again with that alias's version of
    the model (synced into ``shadow/<alias>``) on a worker thread, and log it (``bdi.mlops.shadow``)."""
    alias = settings.registry_shadow_alias
    if not alias:
        return None
    shadow_settings = settings.model_copy(update={"models_dir": shadow_models_dir(settings.models_dir, alias)})
    scorer = ShadowScorer(InspectionService(settings=shadow_settings, extractor=service.extractor), alias=alias)
    service.on_infer = scorer.on_infer
    return scorer


app = create_app()
