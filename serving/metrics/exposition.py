"""What ``GET /metrics`` renders (docs/metrics.md): every worker's instruments summed from the multiprocess
folder, plus the families read at scrape time (:class:`ScrapeCollectors`: the registry sync state and the build)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from bdi import __version__
from serving.metrics.folder import forget_dead_workers

CONTENT_TYPE = CONTENT_TYPE_LATEST
# collect() of a family computed at scrape time (from files every worker sees the same way)
FamiliesFn = Callable[[], Iterable[Metric]]


class ScrapeCollectors(Collector):
    """Families computed when scraped, by whichever worker answers; ``add`` more (e.g. the drift gauges,
    :func:`drift_families`)."""

    def __init__(self) -> None:
        self._sources: list[FamiliesFn] = [build_info]

    def add(self, families: FamiliesFn) -> None:
        self._sources.append(families)

    def collect(self) -> Iterable[Metric]:
        for source in self._sources:
            yield from source()


def render(folder: Path, scraped: ScrapeCollectors) -> bytes:
    """The text exposition: the multiprocess folder's values (dead workers' live gauges dropped first) and
    ``scraped``'s families."""
    forget_dead_workers(folder)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    registry.register(scraped)
    return generate_latest(registry)


def build_info() -> Iterable[Metric]:
    info = GaugeMetricFamily("bdi_build_info", "Always 1; the server's version as a label.", labels=["version"])
    info.add_metric([__version__], 1.0)
    yield info


def registry_sync_families(health: Mapping[str, Any]) -> Iterable[Metric]:
    """The registry follower's state from ``SyncStatusReader.health()`` (``/health``'s ``registry``): following,
    reachable, staleness, last success, synced and failed versions. Unknown values (never synced) are left out."""
    following = GaugeMetricFamily("bdi_registry_sync_following",
                                  "1 when this server follows the model registry (BDI_REGISTRY_SYNC_ON_START).")
    following.add_metric([], 1.0 if health.get("following") else 0.0)
    yield following
    interval = GaugeMetricFamily("bdi_registry_sync_interval_seconds", "Seconds between two registry syncs.")
    interval.add_metric([], float(health.get("interval_s") or 0.0))
    yield interval
    if health.get("reachable") is not None:
        reachable = GaugeMetricFamily("bdi_registry_sync_reachable",
                                      "1 when the last sync attempt reached the registry.")
        reachable.add_metric([], 1.0 if health["reachable"] else 0.0)
        yield reachable
    if health.get("stale_s") is not None:
        stale = GaugeMetricFamily("bdi_registry_sync_staleness_seconds",
                                  "Seconds since the registry was last reached by a successful sync.")
        stale.add_metric([], float(health["stale_s"]))
        yield stale
    synced = GaugeMetricFamily("bdi_registry_synced_models", "Alias holders synced into the models dir.")
    synced.add_metric([], float(len(health.get("synced") or ())))
    yield synced
    failed = GaugeMetricFamily("bdi_registry_sync_failed_models", "Alias holders the last sync could not copy.")
    failed.add_metric([], float(len(health.get("failed") or ())))
    yield failed


DRIFT_STATUS_VALUES = {"ok": 0.0, "warn": 1.0, "alarm": 2.0}


def drift_families(rows: Iterable[Mapping[str, Any]]) -> Iterable[Metric]:
    """``bdi_drift_status`` (0 ok, 1 warn, 2 alarm) and ``bdi_drift_statistic`` per model from drift rows
    ``{"recipe_id", "role_id", "roi_id", "status": "ok"|"warn"|"alarm", "statistics": {name: value}}``: the names
    deploy/prometheus/alerts.yml alerts on. Add it with ``ScrapeCollectors.add(lambda: drift_families(...))``."""
    labels = ["recipe_id", "role_id", "roi_id"]
    status = GaugeMetricFamily("bdi_drift_status", "Drift status of a model's recent scores: 0 ok, 1 warn, 2 alarm.",
                               labels=labels)
    statistic = GaugeMetricFamily("bdi_drift_statistic", "A drift statistic of a model's recent scores.",
                                  labels=[*labels, "statistic"])
    for row in rows:
        ids = [str(row[name]) for name in labels]
        status.add_metric(ids, DRIFT_STATUS_VALUES[str(row["status"])])
        for name, value in dict(row.get("statistics") or {}).items():
            statistic.add_metric([*ids, str(name)], float(value))
    yield status
    yield statistic
