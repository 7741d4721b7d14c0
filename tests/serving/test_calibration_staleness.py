"""A calibration belongs to the memory it was computed for (docs/design.md "Calibration bound to its memory")."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.helpers.synthetic import disc_png

from .conftest import ROI, ROLE, calibrate_ng, fit_from_dataset, infer, upload

GUI_CALIBRATION_TOKEN = "calibration_missing"


def test_infer_reports_calibration_missing_after_refit(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    assert calibrate_ng(client, ok_scores=[10.0]).status_code == 200
    assert infer(client, disc_png(seed=3)).status_code == 200

    refit = fit_from_dataset(client, memory_fit="true")  # a different memory bank
    assert refit.status_code == 200, refit.text

    stale = infer(client, disc_png(seed=3))
    assert stale.status_code == 400
    body = stale.json()
    assert set(body) == {"error", "request_id", "recipe_id"}
    assert body["error"].startswith(GUI_CALIBRATION_TOKEN)
    assert "stale" in body["error"]
    state = client.get("/state", params={"role_id": ROLE, "roi_id": ROI}).json()
    assert state["memory_fitted"] is True and state["calib_present"] is True


def test_recalibrating_after_refit_makes_infer_work_again(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    fit_from_dataset(client)
    calibrate_ng(client, ok_scores=[10.0])
    fit_from_dataset(client, memory_fit="true")
    assert infer(client, disc_png(seed=3)).status_code == 400
    assert calibrate_ng(client, ok_scores=[10.0]).status_code == 200
    assert infer(client, disc_png(seed=3)).json()["decision"] == "ok"


def test_infer_dataset_reports_stale_calibration_as_shape_b(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    fit_from_dataset(client)
    calibrate_ng(client, ok_scores=[10.0])
    fit_from_dataset(client, memory_fit="true")
    response = client.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 400
    assert response.json()["detail"].startswith(GUI_CALIBRATION_TOKEN)


def test_calibration_made_before_any_fit_is_stored_unbound_and_never_applied(client: TestClient) -> None:
    """/calibrate_ng before /fit_ok records no memory: a later fit must not silently use it."""
    early = calibrate_ng(client, ok_scores=[10.0])
    assert early.status_code == 200, early.text
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    response = infer(client, disc_png(seed=3))
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{GUI_CALIBRATION_TOKEN}: unbound")
    assert calibrate_ng(client, ok_scores=[10.0]).status_code == 200  # bound to the fitted memory now
    assert infer(client, disc_png(seed=3)).status_code == 200
