"""The OK / review / NG band over HTTP (docs/contract.md "The OK / review / NG band", issue 29): additive fields on
/calibrate_dataset, /calibrate_ng, /infer and /infer_dataset's items; the legacy ``decision`` of a review score is a
setting (ng by default)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.helpers.synthetic import disc_png

from .conftest import BASE, ROI, ROLE, ClientFactory, calibrate_ng, fit_from_dataset, infer, upload

BAND_KEYS = {"threshold_low", "threshold_high", "band_escape_budget", "band_false_reject_budget", "band_collapsed",
             "band_escape_rate", "band_false_reject_rate", "review_rate"}


def _calib_path(models_dir: Path) -> Path:
    return models_dir / "recipes" / "default" / ROI / f"{BASE}_calib.json"


def _calibrated_with_band(client: TestClient) -> dict[str, object]:
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    upload(client, "ng", seeds=[100, 101], defect="scratch")
    response = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def _force_band(models_dir: Path, *, low: float, high: float) -> None:
    """Rewrite the stored band (the contract's threshold left as calibrated), as a later calibration could."""
    path = _calib_path(models_dir)
    stored = json.loads(path.read_text())
    stored.update(threshold_low=low, threshold_high=high, band_collapsed=low == high)
    path.write_text(json.dumps(stored))


def test_calibrate_dataset_with_ng_samples_sets_the_band_by_default(client: TestClient, models_dir: Path) -> None:
    body = _calibrated_with_band(client)
    assert BAND_KEYS <= set(body)
    low, high = body["threshold_low"], body["threshold_high"]
    assert isinstance(low, float) and isinstance(high, float) and low <= high
    assert body["band_escape_budget"] == 0.0 and body["band_false_reject_budget"] == 0.05
    assert body["band_escape_rate"] == 0.0  # escape budget 0: no NG sample below threshold_low
    stored = json.loads(_calib_path(models_dir).read_text())
    assert stored["threshold_low"] == low and stored["threshold_high"] == high
    assert stored["threshold"] == body["threshold"]  # the contract's threshold rule is unchanged


def test_ok_only_calibration_keeps_the_single_threshold(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    body = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI, "require_ng": False}).json()
    assert not BAND_KEYS & set(body)
    result = infer(client, disc_png(seed=3)).json()
    assert result["review"] is False and result["threshold_low"] is None and result["threshold_high"] is None


def test_the_band_can_be_switched_off(client_factory: ClientFactory) -> None:
    client = client_factory(calibration={"band": False})
    assert not BAND_KEYS & set(_calibrated_with_band(client))


def test_calibrate_ng_keeps_the_single_threshold_for_the_legacy_gui(client: TestClient) -> None:
    body = calibrate_ng(client, ok_scores=[1.0, 1.1, 1.2], ng_scores=[1.05, 3.0]).json()
    assert not BAND_KEYS & set(body)


def test_infer_reports_the_band_and_sends_a_score_inside_it_to_review_decided_ng(
        client: TestClient, models_dir: Path) -> None:
    _calibrated_with_band(client)
    _force_band(models_dir, low=1e-6, high=100.0)  # every score (a distance ≤ 2) is in the band
    body = infer(client, disc_png(seed=3)).json()
    assert body["review"] is True and body["decision"] == "ng"  # fail-safe default
    assert (body["threshold_low"], body["threshold_high"]) == (1e-6, 100.0)
    [recorded] = client.get("/inspections", params={"limit": 1}).json()["items"]  # the record keeps the band
    assert (recorded["review"], recorded["decision"], recorded["threshold_low"]) == (True, "ng", 1e-6)
    _force_band(models_dir, low=50.0, high=100.0)  # every score is below the band
    body = infer(client, disc_png(seed=3)).json()
    assert body["review"] is False and body["decision"] == "ok"
    _force_band(models_dir, low=1e-6, high=2e-6)  # every score is above it
    body = infer(client, disc_png(seed=3)).json()
    assert body["review"] is False and body["decision"] == "ng"


def test_the_decision_of_a_review_score_is_a_setting(client_factory: ClientFactory, models_dir: Path) -> None:
    client = client_factory(calibration={"review_decision": "ok"})
    _calibrated_with_band(client)
    _force_band(models_dir, low=1e-6, high=100.0)
    body = infer(client, disc_png(seed=3)).json()
    assert body["review"] is True and body["decision"] == "ok"


def _infer_dataset_items(client: TestClient) -> list[dict[str, object]]:
    response = client.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 200, response.text
    items: list[dict[str, object]] = response.json()["items"]
    return items


def test_infer_dataset_items_report_the_band_by_the_rule_infer_uses(client: TestClient, models_dir: Path) -> None:
    _calibrated_with_band(client)
    upload(client, "ok", seeds=[7], with_meta=False)  # no scale anywhere: an error item, no score
    scores = sorted(score for item in _infer_dataset_items(client) if isinstance(score := item["score"], float))
    low, high = scores[len(scores) // 3], scores[2 * len(scores) // 3]  # a band with scores below, in and above it
    _force_band(models_dir, low=low, high=high)
    items = _infer_dataset_items(client)
    scored = [item for item in items if item["score"] is not None]
    for item in scored:
        score = item["score"]
        assert isinstance(score, float)
        assert (item["threshold_low"], item["threshold_high"]) == (low, high)
        assert item["review"] is (low <= score < high)
    assert {item["review"] for item in scored} == {True, False}
    [failed] = [item for item in items if item["error"] is not None]
    assert failed["review"] is False and (failed["threshold_low"], failed["threshold_high"]) == (low, high)


def test_infer_dataset_items_without_a_band_are_never_review(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    body = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI, "require_ng": False}).json()
    assert not BAND_KEYS & set(body)
    items = _infer_dataset_items(client)
    assert items and all(item["review"] is False for item in items)
    assert all(item["threshold_low"] is None and item["threshold_high"] is None for item in items)
