"""Test-side helpers: fit + calibrate + export a real tiny model, register it in a real MLflow."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bdi.mlops.registration import RegistrationResult, export_model_dir, register_model
from bdi.mlops.tracking import TrackingTarget, tracked_run
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore

LINEAGE_TAGS = {"dvc_commit": "0123abcd", "data_hash": "5d41402abc4b2a76.dir", "data_source": "data/synthetic",
                "calibration_run_id": "calib-run-1"}


def fit_and_export(
    service: InspectionService, *, ref: ModelRef, fit_on: list[np.ndarray], ok: list[np.ndarray],
    ng: list[np.ndarray], dest: Path,
) -> Path:
    """Fit + calibrate ``ref`` with the real service, then export it alone into ``dest`` (a ModelStore root)."""
    service.fit_images(ref=ref, mm_per_px=0.2, images=fit_on)
    scores = [r.score for r in service.score_images(ref=ref, images=ok + ng)]
    service.calibrate_from_scores(ref=ref, ok_scores=scores[: len(ok)], ng_scores=scores[len(ok):])
    export_model_dir(store=ModelStore(service.settings.models_dir), ref=ref, dest=dest)
    return dest


def register(
    tracking: TrackingTarget, *, model_dir: Path, ref: ModelRef, auroc: float = 0.9,
    tags: Mapping[str, str] = LINEAGE_TAGS, move_alias: bool = True,
) -> RegistrationResult:
    with tracked_run(tracking, run_name="register") as run:
        return register_model(tracking=tracking, run_id=run.run_id, model_dir=model_dir, ref=ref,
                              metrics={"image_auroc": auroc, "false_reject_rate": 0.0}, tags=dict(tags),
                              move_alias=move_alias)
