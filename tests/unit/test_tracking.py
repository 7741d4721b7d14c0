"""MLflow tracking on a real SQLite backend + local artefact folder in a temp dir (no mocks)."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from bdi.mlops.api_runs import ApiRunLogger
from bdi.mlops.outages import TrackingStatus, bounded_mlflow_http, check_tracking_server, reap_orphaned_runs
from bdi.mlops.params import PARAM_VALUE_MAX_CHARS, flatten_params
from bdi.mlops.tracking import (
    EXECUTION_TAG,
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    TrackingConfig,
    execution_run,
    tracked_run,
)
from bdi.patchcore.calibration import Calibration
from bdi.refs import ModelRef
from bdi.service import InspectionService
from tests.helpers.stall import stalling_server

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


@pytest.fixture(scope="module")
def project_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded MLflow (sqlite + mlartifacts) for the module: its schema set-up is the slow part."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def client(project_root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=TrackingConfig().resolve(project_root).tracking_uri)


def _runs(client: MlflowClient, experiment: str, filter_string: str = "") -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string))


def test_empty_tracking_uri_resolves_to_project_sqlite_and_artifact_folder(tmp_path: Path) -> None:
    target = TrackingConfig().resolve(tmp_path)
    uri, artifacts = target.tracking_uri, target.artifact_location
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert artifacts == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_configured_tracking_uri_passes_through(tmp_path: Path) -> None:
    cfg = TrackingConfig(tracking_uri="http://mlflow.internal:5000", artifact_location="store")
    target = cfg.resolve(tmp_path)
    uri, artifacts = target.tracking_uri, target.artifact_location
    assert uri == "http://mlflow.internal:5000"
    assert artifacts == (tmp_path.resolve() / "store").as_uri()


def test_flatten_params_joins_nested_keys_with_dots_and_caps_length() -> None:
    flat = flatten_params({"features": {"blocks": (9, 10, 11), "weights": {"seed": 0}}, "note": "x" * 900})
    assert flat["features.blocks"] == "[9, 10, 11]"
    assert flat["features.weights.seed"] == "0"
    assert len(flat["note"]) == PARAM_VALUE_MAX_CHARS


def test_tracked_run_logs_flattened_params_metrics_and_artifacts(
    project_root: Path, client: MlflowClient, tmp_path: Path
) -> None:
    report = tmp_path / "report.txt"
    report.write_text("hello", encoding="utf-8")
    cfg = TrackingConfig(experiment="unit-run")
    with tracked_run(cfg.resolve(project_root), run_name="unit", tags={"stage": "test"},
                     params={"memory": {"coreset_rate": 0.1}}) as run:
        run.log_metrics({"image_auroc": 0.75, "skipped": None, "nan": math.nan, "timings_ms": {"encode": 3.0}})
        run.log_artifact(report, artifact_path="reports")
        run.log_dict({"a": 1}, "summary.json")
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"memory.coreset_rate": "0.1"}
    assert stored.data.metrics == {"image_auroc": 0.75, "timings_ms.encode": 3.0}
    assert stored.data.tags["stage"] == "test"
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"reports", "summary.json"}
    assert (project_root / "mlflow.db").is_file() and (project_root / "mlartifacts").is_dir()


def test_tracked_run_marks_failed_run_and_reraises(project_root: Path, client: MlflowClient) -> None:
    cfg = TrackingConfig(experiment="unit-fail")
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(cfg.resolve(project_root), run_name="fails"):
            raise RuntimeError("boom")
    [run] = _runs(client, "unit-fail")
    assert run.info.status == "FAILED"


def test_execution_run_is_found_by_its_key_reopened_and_closed_by_each_stage(
    project_root: Path, client: MlflowClient
) -> None:
    # two stage processes of one execution, then a second execution: two parents, children nested
    target = TrackingConfig(experiment="unit-exec").resolve(project_root)
    for key, stages in (("exp-a:1", ("calibrate", "evaluate")), ("exp-b:2", ("calibrate",))):
        for stage in stages:
            with execution_run(target, key=key, run_name=key.split(":")[0], params={"calibration": {"p": 5}},
                               tags={"pipeline": "true"}) as parent:
                assert client.get_run(parent.run_id).info.status == "RUNNING"
                with tracked_run(target, run_name=stage, parent_run_id=parent.run_id) as child:
                    child.log_metrics({f"{stage}/x": 1.0})
                parent.log_metrics({f"{stage}/x": 1.0})
    parents = {r.info.run_name: r for r in _runs(client, "unit-exec", "tags.pipeline = 'true'")}
    assert set(parents) == {"exp-a", "exp-b"}
    a = parents["exp-a"]
    assert a.info.status == "FINISHED" and a.data.params == {"calibration.p": "5"}
    assert set(a.data.metrics) == {"calibrate/x", "evaluate/x"} and a.data.tags[EXECUTION_TAG] == "exp-a:1"
    children = _runs(client, "unit-exec", f"tags.mlflow.parentRunId = '{a.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["calibrate", "evaluate"]
    with pytest.raises(RuntimeError, match="stage failed"):
        with execution_run(target, key="exp-a:1", run_name="exp-a"):
            raise RuntimeError("stage failed")
    assert client.get_run(a.info.run_id).info.status == "FAILED"


def test_api_run_logger_logs_fit_and_calibration_as_source_api_runs(
    service: InspectionService, good_discs: list[np.ndarray], project_root: Path, client: MlflowClient
) -> None:
    logger = ApiRunLogger(TrackingConfig(experiment="unit-api").resolve(project_root))
    hooked = InspectionService(settings=service.settings, extractor=service.extractor,
                               on_fit=logger.on_fit, on_calibrate=logger.on_calibrate)
    fit = hooked.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:4])
    hooked.calibrate_from_scores(ref=REF, ok_scores=[1.0, 2.0, 3.0], ng_scores=[5.0, 6.0])
    runs = {r.data.tags["kind"]: r for r in _runs(client, "unit-api", "tags.source = 'api'")}
    assert set(runs) == {"fit", "calibrate"}
    fit_run, calib_run = runs["fit"], runs["calibrate"]
    assert fit_run.data.metrics["coreset_size"] == fit.coreset_size
    assert fit_run.data.metrics["n_embeddings"] == fit.n_embeddings
    assert fit_run.data.params["ref.roi_id"] == "inspection-1"
    assert fit_run.data.params["features.input_size"] == "112"
    assert fit_run.data.tags["memory_fingerprint"] == fit.fingerprint
    assert calib_run.data.metrics["threshold"] > 0
    assert {"false_reject_rate", "escape_rate"} <= set(calib_run.data.metrics)


def test_api_run_logger_swallows_tracking_outage(
    service: InspectionService, good_discs: list[np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = ApiRunLogger(TrackingConfig(tracking_uri="unreachable-scheme://nowhere").resolve(tmp_path))
    hooked = InspectionService(settings=service.settings, extractor=service.extractor, on_fit=logger.on_fit)
    caplog.set_level(logging.DEBUG, logger="bdi")
    fit = hooked.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2])
    assert fit.memory_path.is_file()
    assert any("tracking.error" in record.getMessage() for record in caplog.records)


def test_api_run_logger_in_background_logs_after_flush(
    service: InspectionService, good_discs: list[np.ndarray], project_root: Path, client: MlflowClient
) -> None:
    logger = ApiRunLogger(TrackingConfig(experiment="unit-bg").resolve(project_root), background=True)
    hooked = InspectionService(settings=service.settings, extractor=service.extractor, on_fit=logger.on_fit)
    hooked.fit_images(ref=REF, mm_per_px=0.2, images=good_discs[:2])
    logger.close()
    assert [r.data.tags["kind"] for r in _runs(client, "unit-bg")] == ["fit"]


# ---------------------------------------------------------------------------------------------- outages


def test_each_mlflow_call_times_out_against_a_server_that_accepts_and_stalls(tmp_path: Path) -> None:
    with stalling_server() as uri, bounded_mlflow_http(1):
        started = time.monotonic()
        with pytest.raises(MlflowException, match="Read timed out") as raised:
            check_tracking_server(TrackingConfig(tracking_uri=uri).resolve(tmp_path))
        assert time.monotonic() - started < 5  # MLflow's own default: 120 s and 7 retries
    # MLflow wraps the HTTP client's error: requests' ConnectionError (max retries: 0) over urllib3's read timeout
    assert isinstance(raised.value.__context__, requests.exceptions.ConnectionError), repr(raised.value.__context__)


def test_bounded_mlflow_http_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with bounded_mlflow_http(2.5):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_full_logging_queue_drops_runs_with_a_warning_and_close_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with stalling_server() as uri, bounded_mlflow_http(1):
        status = TrackingStatus("checking")
        logger = ApiRunLogger(TrackingConfig(tracking_uri=uri).resolve(tmp_path), background=True,
                              queue_size=2, status=status)
        started = time.monotonic()
        for i in range(8):
            logger.on_calibrate(REF, Calibration(threshold=float(i + 1), score_percentile=99, area_mm2_thr=1.0,
                                                 memory_fingerprint=None))
        assert time.monotonic() - started < 0.5  # submitting never waits for the server
        assert logger.dropped >= 5  # one in flight, two queued, the rest dropped
        assert any("queue full" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        started = time.monotonic()
        logger.close(timeout_s=0.5)
        assert time.monotonic() - started < 2.0
    assert any("tracking.shutdown_timeout" in r.getMessage() for r in caplog.records)
    deadline = time.monotonic() + 10
    while status.state != "unreachable" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.state == "unreachable"


def test_runs_left_running_by_a_dead_process_are_marked_killed(project_root: Path, client: MlflowClient) -> None:
    cfg = TrackingConfig(experiment="unit-reap")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    with tracked_run(cfg.resolve(project_root), run_name="live") as live:
        experiment_id = client.get_experiment_by_name("unit-reap").experiment_id
        orphan = client.create_run(experiment_id, run_name="orphan",
                                   tags={OWNER_PID_TAG: str(dead_pid), OWNER_HOST_TAG: socket.gethostname()})
        foreign = client.create_run(experiment_id, run_name="foreign",
                                    tags={OWNER_PID_TAG: str(dead_pid), OWNER_HOST_TAG: "another-host"})
        reaped = reap_orphaned_runs(cfg.resolve(project_root))
        assert reaped == [orphan.info.run_id]
        assert client.get_run(orphan.info.run_id).info.status == "KILLED"
        assert client.get_run(live.run_id).info.status == "RUNNING"  # its process (this one) is alive
        assert client.get_run(foreign.info.run_id).info.status == "RUNNING"  # cannot tell: left alone
