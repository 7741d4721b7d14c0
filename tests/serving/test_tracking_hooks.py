"""Fits and calibrations made through the API (a threshold set by hand included) are logged to MLflow as
source=api runs."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from serving.app import create_app
from tests.helpers.tiny import tiny_settings
from tests.serving.conftest import MM, ROI, ROLE, upload


def test_api_fit_and_calibration_are_logged_as_mlflow_runs(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = tiny_settings(tmp_path / "models", mlflow_tracking_uri=uri, log_dir=tmp_path / "logs",
                             mlflow_shutdown_timeout_s=120)  # this test waits for every run
    with TestClient(create_app(settings)) as client:
        upload(client, "ok", seeds=range(10))
        fit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": MM, "use_dataset": "true"})
        assert fit.status_code == 200, fit.text
        calib = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [0.1, 0.2],
                                                   "ng_scores": [0.5]})
        assert calib.status_code == 200, calib.text
        manual = client.post("/calibrate_manual", json={"role_id": ROLE, "roi_id": ROI, "threshold": 0.3})
        assert manual.status_code == 200, manual.text
    # leaving the client runs the lifespan shutdown, which flushes the background logger
    runs = MlflowClient(tracking_uri=uri).search_runs(
        experiment_ids=[e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments()],
        filter_string="tags.source = 'api'",
    )
    kinds = sorted(run.data.tags.get("kind", "") for run in runs)
    assert kinds == ["calibrate", "calibrate", "fit"]
    manual_run = next(run for run in runs if run.data.tags.get("calibration_source") == "manual")
    assert manual_run.data.metrics["threshold"] == 0.3
    fit_run = next(run for run in runs if run.data.tags["kind"] == "fit")
    assert fit_run.data.metrics["n_embeddings"] == 10 * 64
