"""GET /metrics (docs/metrics.md): the Prometheus text exposition of every worker of this server. Cheap: it reads
the small multiprocess files and the registry status file, never a model."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from serving.auth import scoped
from serving.errors import error_style
from serving.metrics.exposition import CONTENT_TYPE, ScrapeCollectors, render

router = APIRouter(tags=["metrics"], dependencies=[error_style("resource"), scoped("inspect")])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
def metrics(request: Request) -> Response:
    """Request counts and latencies, /infer stage timings, decisions, scores and defect areas, model loads and
    cache hits, fit and calibration durations (summed over the workers), and the registry sync state.

    A plain ``def``: reading the folder's files runs on the thread pool, never on the event loop."""
    scraped: ScrapeCollectors = request.app.state.scrape_collectors
    return Response(render(request.app.state.metrics_folder, scraped), media_type=CONTENT_TYPE)
