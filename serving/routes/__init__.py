"""One router per resource; :data:`ROUTERS` is what ``create_app`` mounts."""

from __future__ import annotations

from fastapi import APIRouter

from serving.routes import audit, calibration, datasets, fit, health, inference, keys, metrics, monitoring, state, ui

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    fit.router,
    calibration.router,
    inference.router,
    datasets.router,
    state.router,
    monitoring.router,
    ui.router,
    metrics.router,
    audit.router,
    keys.router,
)
