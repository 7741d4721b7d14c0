"""``bdi monitor report`` on the SQLite tracking default: a model's drift lands on its calibration run (metrics
``monitor.*``, the status tag and the report artefact); a model without a run gets a ``kind=monitor`` run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bdi.cli import main
from bdi.config import Settings
from bdi.mlops.tracking import TrackingConfig, tracked_run
from bdi.monitoring.record import InspectionLog, InspectionRecord, inspections_dir
from bdi.patchcore.calibration import Calibration
from bdi.refs import ModelRef
from bdi.storage.store import ModelStore


def _records(ref: ModelRef, fingerprint: str, rng: np.random.Generator, *, brightness: float) -> list[InspectionRecord]:
    return [InspectionRecord(
        id=f"{ref.roi_id}-{i}", ts=f"2026-01-01T00:00:{i:02d}.000000Z", request_id=None, **ref.to_dict(),
        memory_fingerprint=fingerprint, registered_model=None, registered_version=None, registered_alias=None,
        score=float(rng.normal(5, 0.5)), threshold=7.0, decision="ok", mm_per_px=0.2, n_regions=0,
        largest_region_mm2=None, image_sha256="0" * 64, image_bytes=1, width=1, height=1,
        brightness=float(rng.normal(brightness, 3)), contrast=float(rng.normal(40, 2)),
        sharpness=float(rng.normal(300, 20))) for i in range(50)]


def _calibrate(store: ModelStore, ref: ModelRef, fingerprint: str, rng: np.random.Generator) -> None:
    reference = {"score": tuple(rng.normal(5, 0.5, 200)), "brightness": tuple(rng.normal(120, 3, 200)),
                 "contrast": tuple(rng.normal(40, 2, 200)), "sharpness": tuple(rng.normal(300, 20, 200))}
    store.calibrations.save(ref, Calibration(threshold=7.0, score_percentile=99, area_mm2_thr=0.0,
                                             memory_fingerprint=fingerprint, false_reject_rate=0.01,
                                             reference=reference))


def test_drift_is_logged_on_the_calibration_run_or_a_new_monitor_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    store = ModelStore(models)
    rng = np.random.default_rng(0)
    calibrated = ModelRef(recipe_id="default", role_id="Inspection", roi_id="lit", model_key="lit")
    orphan = ModelRef(recipe_id="default", role_id="Inspection", roi_id="orphan", model_key="orphan")
    log = InspectionLog(inspections_dir(models))
    for ref, fingerprint, brightness in ((calibrated, "fp-lit", 160.0), (orphan, "fp-orphan", 120.0)):
        _calibrate(store, ref, fingerprint, rng)
        for record in _records(ref, fingerprint, rng, brightness=brightness):
            log.append(record)
    log.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(tracking_uri=uri).resolve(tmp_path)
    with tracked_run(tracking, run_name="api-calibrate", tags={"kind": "calibrate",
                                                                "memory_fingerprint": "fp-lit"}) as run:
        calibration_run = run.run_id

    assert main(["monitor", "report", "--models-dir", str(models), "--tracking-uri", uri,
                 "--project-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"default/Inspection/lit/lit: alarm (lighting), 50 live records, run {calibration_run}" in out
    client = tracking.client()
    logged = client.get_run(calibration_run)
    assert logged.data.tags["monitor.status"] == "alarm" and logged.data.tags["monitor.cause"] == "lighting"
    assert logged.data.metrics["monitor.brightness_psi"] > 0.25 and logged.data.metrics["monitor.level"] == 2
    assert any(a.path.startswith("monitoring/drift_") for a in client.list_artifacts(calibration_run, "monitoring"))
    (monitor_run,) = client.search_runs([logged.info.experiment_id], filter_string="tags.kind = 'monitor'")
    assert monitor_run.data.tags["memory_fingerprint"] == "fp-orphan"
    assert monitor_run.data.tags["monitor.status"] == "ok"
    assert Settings(models_dir=models).drift_window == 200
