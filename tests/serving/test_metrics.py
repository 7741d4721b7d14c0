"""GET /metrics in one process (docs/metrics.md): the text parses, every family follows the naming conventions,
and requests, /infer decisions and stage timings, fits and calibrations show up with low-cardinality labels.
Two real workers adding up: tests/serving/test_metrics_workers.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.metrics.exposition import drift_families, registry_sync_families
from serving.settings import ServingSettings
from tests.helpers.prometheus import families, sample_value
from tests.helpers.synthetic import disc_png
from tests.helpers.tiny import tiny_settings
from tests.serving.conftest import ROI, ROLE, fit_from_dataset, infer, upload

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def scrape(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[TestClient]:
    """The app as a server builds it (its own service, with the store's cache hook), fitted, calibrated from the
    dataset and asked one /infer: every family has values."""
    settings = tiny_settings(tmp_path / "models", log_dir=tmp_path / "logs")
    app = create_app(settings=settings, serving_settings=ServingSettings(metrics_dir=tmp_path / "metrics"))
    with TestClient(app) as client:
        upload(client, "ok", seeds=range(10))
        assert fit_from_dataset(client).status_code == 200
        upload(client, "ng", seeds=[100], defect="scratch")
        assert client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI}).status_code == 200
        assert infer(client, disc_png(seed=3)).status_code == 200
        yield client


def test_metrics_text_parses_and_follows_the_naming_conventions(served: TestClient) -> None:
    found = families(scrape(served))
    assert {"bdi_http_requests", "bdi_http_request_duration_seconds", "bdi_infer_stage_duration_seconds",
            "bdi_inspection_decisions", "bdi_inspection_score", "bdi_inspection_defect_area_square_meters",
            "bdi_fit_duration_seconds", "bdi_calibration_duration_seconds", "bdi_registry_sync_following",
            "bdi_model_loads", "bdi_model_cache_lookups", "bdi_build_info"} <= set(found)
    for name, family in found.items():
        assert name.startswith("bdi_"), name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if "duration" in name or "staleness" in name or "interval" in name:
            assert name.endswith("_seconds"), name
        for sample in family.samples:
            assert "request_id" not in sample.labels, name


def test_infer_counts_its_decision_and_times_its_stages(calibrated: TestClient) -> None:
    model = {"recipe_id": "default", "role_id": ROLE, "roi_id": ROI}
    before = scrape(calibrated)
    response = infer(calibrated, disc_png(seed=4))
    assert response.status_code == 200, response.text
    decision = response.json()["decision"]
    after = scrape(calibrated)

    def delta(name: str, labels: dict[str, str]) -> float:
        return sample_value(after, name, labels) - sample_value(before, name, labels)

    assert delta("bdi_inspection_decisions_total", {**model, "decision": decision, "model_version": "none"}) == 1
    assert delta("bdi_inspection_score_count", model) == 1
    assert delta("bdi_inspection_defect_area_square_meters_count", model) == 1
    for stage in ("decode", "forward", "search", "regions"):  # search = the kNN
        assert delta("bdi_infer_stage_duration_seconds_count", {"stage": stage}) == 1, stage
    score_sum = delta("bdi_inspection_score_sum", model)
    assert score_sum == pytest.approx(response.json()["score"], rel=1e-6)


def test_requests_are_counted_by_route_template_and_unknown_paths_share_one_label(client: TestClient) -> None:
    query = {"role_id": ROLE, "roi_id": ROI, "label": "ok"}
    for name in ("a.png", "b.png"):
        assert client.get("/datasets/file", params={**query, "filename": name}).status_code == 404
    for path in ("/no-such-route-1", "/no-such-route-2"):
        assert client.get(path).status_code == 404
    text = scrape(client)
    assert sample_value(text, "bdi_http_requests_total",
                        {"route": "/datasets/file", "method": "GET", "status": "404"}) == 2
    assert sample_value(text, "bdi_http_requests_total",
                        {"route": "unmatched", "method": "GET", "status": "404"}) == 2
    routes = {s.labels["route"] for s in families(text)["bdi_http_requests"].samples}
    assert not any("no-such-route" in route or "a.png" in route for route in routes)


def test_fit_and_calibration_durations_are_observed(calibrated: TestClient) -> None:
    text = scrape(calibrated)
    assert sample_value(text, "bdi_fit_duration_seconds_count", {"source": "dataset"}) >= 1
    assert sample_value(text, "bdi_fit_stage_duration_seconds_count", {"stage": "coreset"}) >= 1
    assert sample_value(text, "bdi_calibration_duration_seconds_count", {"method": "dataset"}) >= 1


def test_registry_sync_state_is_exported_when_not_following(client: TestClient) -> None:
    text = scrape(client)
    assert sample_value(text, "bdi_registry_sync_following") == 0
    assert "bdi_registry_sync_staleness_seconds" not in families(text)  # never synced: no value, not 0


def test_alert_rules_use_only_exported_metric_names(served: TestClient) -> None:
    """Every ``bdi_*`` series deploy/prometheus/alerts.yml reads is one this server exports (plus the registry
    families of a following server that synced once, and drift_families' names, the drift monitor's)."""
    synced = registry_sync_families({"following": True, "interval_s": 30, "reachable": True, "stale_s": 1.0})
    exported = set()
    for family in [*families(scrape(served)).values(), *synced, *drift_families([])]:
        exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count",
                     f"{family.name}_sum"}
    used = set(re.findall(r"\bbdi_[a-z0-9_]+", ALERTS.read_text(encoding="utf-8")))
    assert used, "alerts.yml names no bdi_ series"
    assert used <= exported, sorted(used - exported)


def test_drift_families_added_to_the_scrape_collectors_are_exported(client: TestClient) -> None:
    """The drift monitor's wiring: ``app.state.scrape_collectors.add(lambda: drift_families(rows))``."""
    rows = [{"recipe_id": "default", "role_id": ROLE, "roi_id": ROI, "status": "alarm",
             "statistics": {"ks": 0.41, "mean_shift": 2.5}},
            {"recipe_id": "default", "role_id": ROLE, "roi_id": "inspection-2", "status": "ok", "statistics": {}}]
    app = client.app
    app.state.scrape_collectors.add(lambda: drift_families(rows))  # type: ignore[attr-defined]
    text = scrape(client)
    model = {"recipe_id": "default", "role_id": ROLE}
    assert sample_value(text, "bdi_drift_status", {**model, "roi_id": ROI}) == 2
    assert sample_value(text, "bdi_drift_status", {**model, "roi_id": "inspection-2"}) == 0
    assert sample_value(text, "bdi_drift_statistic", {**model, "roi_id": ROI, "statistic": "ks"}) == 0.41
