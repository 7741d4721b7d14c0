"""BDI_REGISTRY_SYNC_ON_START: a server starting on an empty models dir serves the champion version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from bdi.mlops.registration import export_model_dir, register_model
from bdi.mlops.tracking import TrackingConfig, tracked_run
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore
from serving.app import create_app
from tests.helpers.synthetic import png_bytes
from tests.helpers.tiny import tiny_settings

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def test_server_syncs_registered_champion_at_startup(
    tmp_path: Path, service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    service.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:10])
    scores = [r.score for r in service.score_images(ref=REF, images=good_discs[10:] + defect_discs)]
    calib = service.calibrate_from_scores(ref=REF, ok_scores=scores[:2], ng_scores=scores[2:])
    exported = tmp_path / "export"
    export_model_dir(store=ModelStore(service.settings.models_dir), ref=REF, dest=exported)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(tracking_uri=uri).resolve(tmp_path)
    with tracked_run(tracking, run_name="register") as run:
        register_model(tracking=tracking, run_id=run.run_id, model_dir=exported, ref=REF,
                       metrics={"image_auroc": 1.0}, tags={})

    served = tmp_path / "served-models"
    settings = tiny_settings(served, mlflow_tracking_uri=uri, registry_sync_on_start=True, log_dir=tmp_path / "logs")
    with TestClient(create_app(settings)) as client:
        state = client.get("/state", params={"role_id": "Inspection", "roi_id": "inspection-1"}).json()
        body = client.post(
            "/infer",
            data={"role_id": "Inspection", "roi_id": "inspection-1", "mm_per_px": "0.2"},
            files={"image": ("disc.png", png_bytes(defect_discs[0]), "image/png")},
        ).json()
    assert state["memory_fitted"] and state["calib_present"]
    assert body["threshold"] == calib.threshold
