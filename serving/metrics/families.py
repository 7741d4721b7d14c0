"""The server's instruments (docs/metrics.md "Families"): ``bdi_`` names in base units, counters ``_total``,
durations ``_seconds``, low-cardinality labels only (route templates, never raw paths or request ids).

Built once per app in the lifespan, after :func:`serving.metrics.folder.use_folder`; the instruments belong to
no registry: ``GET /metrics`` reads every worker's values from the multiprocess folder
(:mod:`serving.metrics.exposition`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from bdi.service import FitResult, InferOutcome

# latency of whole requests and of /fit_ok and calibrations: 5 ms … 5 min
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# one stage of one /infer: 0.5 ms … 10 s
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# image scores are patch distances of L2-normalised features, in [0, 2]
SCORE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0)
# the largest defect region of a crop, m² (1 mm² = 1e-6 m²): 0 (no region), 0.1 mm² … 10 cm²
AREA_BUCKETS_M2 = (0.0, 1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3)
MM2_TO_M2 = 1e-6
MODEL_LABELS = ("recipe_id", "role_id", "roi_id")
NO_VERSION = "none"  # model_version of a model the registry did not deliver (fitted on this server)


class Metrics:
    """Every instrument the server updates; one per app (``app.state.metrics``)."""

    def __init__(self) -> None:
        self.http_requests = Counter(
            "bdi_http_requests", "HTTP requests answered, by route template, method and status code.",
            ("route", "method", "status"), registry=None)
        self.http_duration = Histogram(
            "bdi_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status.",
            ("route", "method", "status"), buckets=REQUEST_BUCKETS_S, registry=None)
        self.http_in_progress = Gauge(
            "bdi_http_requests_in_progress", "HTTP requests being answered now, summed over the live workers.",
            multiprocess_mode="livesum", registry=None)
        self.infer_stage = Histogram(
            "bdi_infer_stage_duration_seconds",
            "Time of one stage of an answered /infer (decode, mask, letterbox, normalise, forward, search = the "
            "kNN, map, blur, score, regions, png).", ("stage",), buckets=STAGE_BUCKETS_S, registry=None)
        self.decisions = Counter(
            "bdi_inspection_decisions", "Answered /infer decisions (ok | ng) per model and registered version.",
            (*MODEL_LABELS, "decision", "model_version"), registry=None)
        self.scores = Histogram(
            "bdi_inspection_score", "Image scores of answered /infer calls (dimensionless, in [0, 2]).",
            MODEL_LABELS, buckets=SCORE_BUCKETS, registry=None)
        self.defect_area = Histogram(
            "bdi_inspection_defect_area_square_meters",
            "Area of the largest defect region of an answered /infer (0 when none), square metres.",
            MODEL_LABELS, buckets=AREA_BUCKETS_M2, registry=None)
        self.cache_lookups = Counter(
            "bdi_model_cache_lookups", "Lookups in the model store's caches (memory, model, calibration) by result.",
            ("cache", "result"), registry=None)
        self.model_loads = Counter(
            "bdi_model_loads", "Models read from disk for scoring (a model-cache miss that loaded one).",
            registry=None)
        self.fit_duration = Histogram(
            "bdi_fit_duration_seconds", "Time of a successful /fit_ok, by source (images | dataset).",
            ("source",), buckets=REQUEST_BUCKETS_S, registry=None)
        self.fit_stage = Histogram(
            "bdi_fit_stage_duration_seconds", "Time of one stage of a successful fit (encode, coreset, index, save).",
            ("stage",), buckets=REQUEST_BUCKETS_S, registry=None)
        self.calibration_duration = Histogram(
            "bdi_calibration_duration_seconds",
            "Time of a successful calibration, by method (scores = /calibrate_ng, dataset, manual).",
            ("method",), buckets=REQUEST_BUCKETS_S, registry=None)

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        labels = {"route": route, "method": method, "status": str(status)}
        self.http_requests.labels(**labels).inc()
        self.http_duration.labels(**labels).observe(seconds)

    def observe_infer(self, *, ids: Mapping[str, str], outcome: InferOutcome) -> None:
        """One answered /infer: its stage timings, decision, score and largest defect area; ``ids`` holds
        ``recipe_id``, ``role_id`` and ``roi_id``."""
        model = {name: ids[name] for name in MODEL_LABELS}
        for stage, ms in outcome.result.timings_ms.items():
            self.infer_stage.labels(stage=stage).observe(float(ms) / 1e3)
        lineage: Mapping[str, Any] = outcome.lineage or {}
        version = lineage.get("registered_version")
        self.decisions.labels(**model, decision=outcome.decision,
                              model_version=str(version) if version is not None else NO_VERSION).inc()
        self.scores.labels(**model).observe(float(outcome.result.score))
        largest_mm2 = max((region.area_mm2 for region in outcome.result.regions), default=0.0)
        self.defect_area.labels(**model).observe(float(largest_mm2) * MM2_TO_M2)

    def observe_fit(self, *, result: FitResult, source: str, seconds: float) -> None:
        self.fit_duration.labels(source=source).observe(seconds)
        for stage, ms in result.timings_ms.items():
            self.fit_stage.labels(stage=stage).observe(float(ms) / 1e3)

    def observe_calibration(self, *, method: str, seconds: float) -> None:
        self.calibration_duration.labels(method=method).observe(seconds)

    def on_cache_event(self, cache: str, event: str) -> None:
        """The store's cache hook (``InspectionService(on_cache_event=)``): hits and misses, and model loads."""
        if event == "put":
            if cache == "model":
                self.model_loads.inc()
            return
        self.cache_lookups.labels(cache=cache, result=event).inc()
