"""HTTP side of "serving follows the registry": lineage on /infer, /state, /manifest; /health's registry view;
the 409 of the conflict rule. A real app (TestClient) following a real MLflow registry on SQLite."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from bdi.mlops.tracking import TrackingConfig, TrackingTarget
from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore
from serving.app import create_app
from tests.helpers.registry import LINEAGE_TAGS, fit_and_export, register
from tests.helpers.synthetic import png_bytes
from tests.helpers.tiny import tiny_settings
from tests.serving.conftest import ROI, ROLE, calibrate_ng, fit_from_dataset, infer, upload

REF = ModelRef.create(recipe_id="default", role_id=ROLE, roi_id=ROI, model_key=None)
IDS = {"role_id": ROLE, "roi_id": ROI}


@pytest.fixture()
def registered(
    tmp_path: Path, service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> tuple[str, TrackingTarget, Path]:
    """A champion version 1 of REF in an MLflow on SQLite; returns (name, tracking target, its export)."""
    exported = fit_and_export(service, ref=REF, fit_on=good_discs[:10], ok=good_discs[10:], ng=defect_discs,
                              dest=tmp_path / "export")
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").resolve(tmp_path)
    result = register(tracking, model_dir=exported, ref=REF)
    return result.name, tracking, exported


@pytest.fixture()
def following(
    tmp_path: Path, tiny_extractor: FeatureExtractor, registered: tuple[str, TrackingTarget, Path]
) -> Iterator[TestClient]:
    """A server following that registry (sync at start-up, then every 0.5 s) on an empty models dir."""
    settings = tiny_settings(tmp_path / "served", mlflow_tracking_uri=registered[1].tracking_uri,
                             registry_sync_on_start=True, registry_sync_interval_s=0.5, log_dir=tmp_path / "logs")
    app = create_app(service=InspectionService(settings=settings, extractor=tiny_extractor))
    with TestClient(app) as client:
        yield client


def test_infer_reports_the_lineage_of_the_registered_version(
    following: TestClient, registered: tuple[str, TrackingTarget, Path], defect_discs: list[np.ndarray]
) -> None:
    response = infer(following, png_bytes(defect_discs[0]))
    assert response.status_code == 200, response.text
    lineage = response.json()["lineage"]
    memory = ModelStore(registered[2]).load_memory(REF)
    assert memory is not None
    assert lineage["source"] == "registry" and lineage["registry_managed"] is True
    assert (lineage["registered_model"], lineage["registered_version"], lineage["registered_alias"]) == (
        registered[0], 1, "champion")
    assert lineage["mlflow_run_id"] and lineage["git_commit"] == LINEAGE_TAGS["dvc_commit"]
    assert lineage["data_hash"] == LINEAGE_TAGS["data_hash"] and lineage["data_source"] == "data/synthetic"
    assert lineage["backbone"] == "vit_small_patch14_dinov2"
    assert lineage["weights_name"] == memory.metadata["features"]["weights"]["name"]
    assert "weights_sha256" in lineage and lineage["memory_fingerprint"] == memory.fingerprint
    assert lineage["threshold_source"] == "calibration_run" and lineage["calibration_run_id"] == "calib-run-1"


def test_state_and_manifest_carry_the_same_lineage(following: TestClient) -> None:
    state = following.get("/state", params=IDS).json()
    manifest = following.get("/manifest", params=IDS).json()
    assert state["memory_fitted"] and state["lineage"]["registered_version"] == 1
    assert manifest["lineage"] == state["lineage"]


def test_health_lists_the_synced_versions_and_how_stale_the_registry_view_is(
    following: TestClient, registered: tuple[str, TrackingTarget, Path]
) -> None:
    registry = following.get("/health").json()["registry"]
    assert registry["following"] is True and registry["reachable"] is True and registry["error"] is None
    assert 0 <= registry["stale_s"] < 60 and registry["interval_s"] == 0.5
    assert [(m["name"], m["version"], m["model_key"]) for m in registry["synced"]] == [(registered[0], 1, ROI)]


def test_the_start_up_sync_is_in_the_audit_trail_as_the_registry(
    following: TestClient, registered: tuple[str, TrackingTarget, Path], tmp_path: Path
) -> None:
    from bdi.security.audit import AuditLog, verify

    log = AuditLog(tmp_path / "served" / ".security")
    [record] = [r for r in log.records() if r["action"] == "registry.sync"]
    memory = ModelStore(registered[2]).load_memory(REF)
    assert memory is not None
    assert record["key_id"] == "registry" and record["roi"]["roi_id"] == ROI
    assert record["before"]["memory_fingerprint"] is None
    assert record["after"]["memory_fingerprint"] == memory.fingerprint and record["after"]["version"] == 1
    assert verify(log.path).ok


def test_fit_ok_on_a_registry_model_is_a_409_naming_the_registered_version(
    following: TestClient, registered: tuple[str, TrackingTarget, Path], good_discs: list[np.ndarray]
) -> None:
    files = [("images", ("a.png", png_bytes(good_discs[0]), "image/png"))]
    response = following.post("/fit_ok", data={**IDS, "mm_per_px": "0.2"}, files=files)
    assert response.status_code == 409
    body = response.json()
    assert set(body) == {"error", "request_id", "recipe_id"}  # shape A, like every /fit_ok error
    assert f"{registered[0]} version 1 (alias 'champion')" in body["error"]
    assert calibrate_ng(following, ok_scores=[0.1], ng_scores=[0.9]).status_code == 409
    assert following.get("/state", params=IDS).json()["lineage"]["registered_version"] == 1


def test_health_without_registry_following_says_so(client: TestClient) -> None:
    registry = client.get("/health").json()["registry"]
    assert registry["following"] is False and registry["synced"] == [] and registry["last_sync_utc"] is None


def test_api_fit_lineage_and_threshold_source_go_from_api_to_stale_after_a_refit(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    lineage = client.get("/state", params=IDS).json()["lineage"]
    assert lineage["source"] == "api" and lineage["data_source"] == "api:ok_dataset" and lineage["data_hash"]
    assert lineage["threshold_source"] is None and lineage["registered_model"] is None
    assert calibrate_ng(client, ok_scores=[0.1, 0.2], ng_scores=[0.9]).status_code == 200
    assert client.get("/state", params=IDS).json()["lineage"]["threshold_source"] == "api"
    assert fit_from_dataset(client, memory_fit="true").status_code == 200
    assert client.get("/manifest", params=IDS).json()["lineage"]["threshold_source"] == "stale"


def test_shadow_mode_logs_the_challengers_score_while_the_champion_decides(
    tmp_path: Path, tiny_extractor: FeatureExtractor, registered: tuple[str, TrackingTarget, Path],
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray],
) -> None:
    name, cfg, _ = registered
    challenger = fit_and_export(service, ref=REF, fit_on=good_discs[2:12], ok=good_discs[:2], ng=defect_discs,
                                dest=tmp_path / "export-2")
    register(cfg, model_dir=challenger, ref=REF, move_alias=False)
    MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri).set_registered_model_alias(
        name, "challenger", "2")
    logs = tmp_path / "logs"
    settings = tiny_settings(tmp_path / "served", mlflow_tracking_uri=cfg.tracking_uri, registry_sync_on_start=True,
                             registry_sync_interval_s=0.5, registry_shadow_alias="challenger", log_dir=logs)
    with TestClient(create_app(service=InspectionService(settings=settings, extractor=tiny_extractor))) as client:
        body = infer(client, png_bytes(defect_discs[0])).json()
        assert body["lineage"]["registered_version"] == 1  # the champion decides
        deadline = time.monotonic() + 60
        events: list[dict[str, Any]] = []
        while not events and time.monotonic() < deadline:
            time.sleep(0.2)
            lines = (logs / "backend_diagnostics.jsonl").read_text(encoding="utf-8").splitlines()
            events = [e for e in map(json.loads, lines) if e.get("event") == "infer.shadow"]
    [event] = events
    assert event["champion"]["version"] == 1 and event["champion"]["score"] == body["score"]
    assert event["challenger"]["version"] == 2
    # version 2 on its own (its exported folder, a fresh service) scores the same image the same way
    version_2 = InspectionService(settings=tiny_settings(challenger), extractor=tiny_extractor).infer(
        ref=REF, mm_per_px=0.2, image=png_bytes(defect_discs[0]))
    assert event["challenger"]["score"] == pytest.approx(float(version_2.result.score), rel=1e-6)
    assert event["challenger"]["score"] != pytest.approx(body["score"], rel=1e-6)  # two models, two scores
    assert (event["challenger"]["threshold"], event["challenger"]["decision"]) == (
        version_2.threshold, version_2.decision)
    assert event["agree"] == (event["challenger"]["decision"] == body["decision"])


@pytest.mark.slow
def test_a_fresh_server_process_syncs_at_start_up_alongside_its_mlflow_start_up_check(
    tmp_path: Path, registered: tuple[str, TrackingTarget, Path]
) -> None:
    """In a new process the follower and the start-up check are two threads reaching MLflow at once: its
    first import must not race (a deadlock there left a half-imported mlflow and every sync failing)."""
    from tests.helpers.servers import UvicornServer, server_env

    env = server_env(tmp_path, tmp_path / "served", BDI_MLFLOW_TRACKING_URI=registered[1].tracking_uri,
                     BDI_REGISTRY_SYNC_ON_START="1")
    with UvicornServer(cwd=tmp_path / "server", env=env) as server:
        registry = httpx.get(f"{server.base_url}/health", timeout=30).json()["registry"]
    assert registry["reachable"] is True and registry["error"] is None, registry
    assert [(m["name"], m["version"]) for m in registry["synced"]] == [(registered[0], 1)]
