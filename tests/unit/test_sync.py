"""Serving follows the registry: lineage sidecars, the conflict rule both ways, rollback, the follower loop,
an unreachable registry and whole-version reads, on a real MLflow (SQLite) with the tiny real model."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from bdi.errors import CalibrationMissingError, RegistryManagedError, StorageError
from bdi.mlops.follower import RegistryFollower, SyncStatusReader, read_status
from bdi.mlops.registry_sync import materialise_model, sync_registry
from bdi.mlops.tracking import TrackingConfig, TrackingTarget
from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage import model_lock
from bdi.storage.lineage import read_lineage
from bdi.storage.store import ModelStore
from tests.helpers.registry import LINEAGE_TAGS, fit_and_export, register
from tests.helpers.synthetic import png_bytes
from tests.helpers.tiny import tiny_settings

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


@pytest.fixture(scope="module")
def project_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def exports(
    tmp_path_factory: pytest.TempPathFactory, tiny_extractor: FeatureExtractor, good_discs: list[np.ndarray],
    defect_discs: list[np.ndarray],
) -> tuple[Path, Path]:
    """Two different calibrated models of REF, each exported alone (version 1 and version 2 material)."""
    root = tmp_path_factory.mktemp("exports")
    service = InspectionService(settings=tiny_settings(root / "work"), extractor=tiny_extractor)
    one = fit_and_export(service, ref=REF, fit_on=good_discs[:10], ok=good_discs[10:], ng=defect_discs,
                         dest=root / "v1")
    two = fit_and_export(service, ref=REF, fit_on=good_discs[2:12], ok=good_discs[:2], ng=defect_discs,
                         dest=root / "v2")
    return one, two


def _tracking(prefix: str, project_root: Path) -> TrackingTarget:
    return TrackingConfig(experiment="unit-sync", registered_model_prefix=prefix).resolve(project_root)


def _client(tracking: TrackingTarget) -> MlflowClient:
    uri = tracking.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _served_service(models: Path, extractor: FeatureExtractor) -> InspectionService:
    return InspectionService(settings=tiny_settings(models), extractor=extractor)


def _fingerprint(model_dir: Path) -> str:
    memory = ModelStore(model_dir).load_memory(REF)
    assert memory is not None
    return memory.fingerprint


def test_sync_writes_a_lineage_naming_version_run_commit_and_data(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    tracking = _tracking("lineage", project_root)
    registered = register(tracking, model_dir=exports[0], ref=REF)
    served = ModelStore(tmp_path / "served")
    report = sync_registry(tracking=tracking, models_dir=served.root)
    lineage = read_lineage(served, REF)
    assert lineage is not None and lineage.source == "registry" and lineage.managed
    assert (lineage.registered_model, lineage.registered_version, lineage.registered_alias) == (
        registered.name, 1, "champion")
    version = _client(tracking).get_model_version(registered.name, "1")
    assert lineage.mlflow_run_id == version.run_id
    assert lineage.git_commit == LINEAGE_TAGS["dvc_commit"] and lineage.data_hash == LINEAGE_TAGS["data_hash"]
    assert lineage.calibration_run_id == "calib-run-1"
    assert lineage.memory_fingerprint == _fingerprint(exports[0]) == report.held[0].fingerprint


def test_second_sync_downloads_nothing_when_the_lineage_names_the_held_version(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    tracking = _tracking("nodownload", project_root)
    register(tracking, model_dir=exports[0], ref=REF)
    served = tmp_path / "served"
    sync_registry(tracking=tracking, models_dir=served)
    memory = ModelStore(served).paths(REF).memory
    before = memory.stat().st_mtime_ns
    again = sync_registry(tracking=tracking, models_dir=served)
    assert again.changed == [] and [m.version for m in again.held] == [1]
    assert memory.stat().st_mtime_ns == before


def test_moving_the_alias_back_restores_the_old_model(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    tracking = _tracking("rollback", project_root)
    first = register(tracking, model_dir=exports[0], ref=REF, auroc=0.8)
    register(tracking, model_dir=exports[1], ref=REF, auroc=0.9)
    served = ModelStore(tmp_path / "served")
    sync_registry(tracking=tracking, models_dir=served.root)
    assert _fingerprint(served.root) == _fingerprint(exports[1])

    _client(tracking).set_registered_model_alias(first.name, "champion", "1")
    [restored] = sync_registry(tracking=tracking, models_dir=served.root).changed
    assert restored.version == 1
    assert _fingerprint(served.root) == _fingerprint(exports[0])
    assert served.calibrations.document(REF) == ModelStore(exports[0]).calibrations.document(REF)
    lineage = read_lineage(served, REF)
    assert lineage is not None and lineage.registered_version == 1


def test_registry_replaces_an_api_fitted_model_of_the_same_key(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path, tiny_extractor: FeatureExtractor,
    good_discs: list[np.ndarray],
) -> None:
    served = _served_service(tmp_path / "served", tiny_extractor)
    served.fit_ok(ref=REF, mm_per_px=0.2, images=[(f"{i}.png", png_bytes(img)) for i, img in enumerate(good_discs)])
    api = read_lineage(served.store, REF)
    assert api is not None and api.source == "api" and api.data_source == "api:upload"

    tracking = _tracking("wins", project_root)
    register(tracking, model_dir=exports[0], ref=REF)
    sync_registry(tracking=tracking, models_dir=served.settings.models_dir)
    lineage = read_lineage(served.store, REF)
    assert lineage is not None and lineage.source == "registry"
    assert _fingerprint(served.settings.models_dir) == _fingerprint(exports[0]) != api.memory_fingerprint


def test_api_fit_and_calibration_of_a_registry_model_are_refused_naming_the_version(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path, tiny_extractor: FeatureExtractor,
    good_discs: list[np.ndarray],
) -> None:
    tracking = _tracking("refuse", project_root)
    registered = register(tracking, model_dir=exports[0], ref=REF)
    served = _served_service(tmp_path / "served", tiny_extractor)
    sync_registry(tracking=tracking, models_dir=served.settings.models_dir)
    memory_before = ModelStore(served.settings.models_dir).paths(REF).memory.read_bytes()
    with pytest.raises(RegistryManagedError, match=rf"{registered.name} version 1 \(alias 'champion'\)"):
        served.fit_ok(ref=REF, mm_per_px=0.2, images=[("a.png", png_bytes(good_discs[0]))])
    with pytest.raises(RegistryManagedError):
        served.calibrate_from_scores(ref=REF, ok_scores=[0.1], ng_scores=[0.9])
    assert ModelStore(served.settings.models_dir).paths(REF).memory.read_bytes() == memory_before
    other = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key="local")
    served.fit_ok(ref=other, mm_per_px=0.2, images=[("a.png", png_bytes(good_discs[0]))])  # another key is free


def test_removing_the_alias_releases_the_model_to_the_api(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path, tiny_extractor: FeatureExtractor,
    good_discs: list[np.ndarray],
) -> None:
    tracking = _tracking("release", project_root)
    registered = register(tracking, model_dir=exports[0], ref=REF)
    served = _served_service(tmp_path / "served", tiny_extractor)
    sync_registry(tracking=tracking, models_dir=served.settings.models_dir)
    _client(tracking).delete_registered_model_alias(registered.name, "champion")
    report = sync_registry(tracking=tracking, models_dir=served.settings.models_dir)
    assert report.released == (registered.name,) and report.held == ()
    lineage = read_lineage(served.store, REF)
    assert lineage is not None and not lineage.managed
    assert ModelStore(served.settings.models_dir).load_memory(REF) is not None  # still served
    served.fit_ok(ref=REF, mm_per_px=0.2, images=[("a.png", png_bytes(good_discs[0]))])


def test_follower_picks_up_a_promotion_within_the_interval(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    tracking = _tracking("follow", project_root)
    first = register(tracking, model_dir=exports[0], ref=REF)
    served = tmp_path / "served"
    follower = RegistryFollower(tracking=tracking, models_dir=served, interval_s=0.5)
    follower.start(wait_first_s=60)
    try:
        assert _fingerprint(served) == _fingerprint(exports[0])
        register(tracking, model_dir=exports[1], ref=REF, move_alias=False)
        _client(tracking).set_registered_model_alias(first.name, "champion", "2")
        deadline = time.monotonic() + 30
        while _fingerprint(served) != _fingerprint(exports[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _fingerprint(served) == _fingerprint(exports[1])
    finally:
        follower.stop()
    health = SyncStatusReader(served, following=True, alias="champion", interval_s=0.5).health()
    assert health["reachable"] is True and health["stale_s"] < 30
    assert [(m["name"], m["version"]) for m in health["synced"]] == [(first.name, 2)]


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_registry_keeps_the_models_and_health_reports_the_stale_view(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracking = _tracking("down", project_root)
    register(tracking, model_dir=exports[0], ref=REF)
    served = tmp_path / "served"
    RegistryFollower(tracking=tracking, models_dir=served, interval_s=0).run()
    synced_at = read_status(served)
    assert synced_at is not None and synced_at["error"] is None

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = TrackingConfig(tracking_uri=f"http://127.0.0.1:{_closed_port()}", registered_model_prefix="down")
    RegistryFollower(tracking=down.resolve(project_root), models_dir=served, interval_s=0).run()
    health = SyncStatusReader(served, following=True, alias="champion", interval_s=0).health()
    assert health["reachable"] is False and health["error"]
    assert health["last_sync_utc"] == synced_at["last_success_utc"] and health["stale_s"] >= 0
    assert [m["version"] for m in health["synced"]] == [1]
    assert ModelStore(served).load_model(REF) is not None  # still serving what it has


def test_infer_waits_for_a_sync_in_progress_and_sees_the_whole_new_version(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path, tiny_extractor: FeatureExtractor,
    defect_discs: list[np.ndarray],
) -> None:
    served = _served_service(tmp_path / "served", tiny_extractor)
    materialise_model(source=ModelStore(exports[0]), ref=REF, target=served.store)
    new_threshold = ModelStore(exports[1]).calibrations.document(REF)["threshold"]  # type: ignore[index]
    outcome: dict[str, object] = {}

    def infer() -> None:
        try:
            outcome["result"] = served.infer(ref=REF, mm_per_px=0.2, image=png_bytes(defect_discs[0]))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    src, dst = ModelStore(exports[1]).paths(REF), ModelStore(served.settings.models_dir).paths(REF)
    with model_lock.writing(served.store, REF):  # a sync between its memory and its calibration writes
        for a, b in ((src.index, dst.index), (src.memory, dst.memory)):
            b.write_bytes(a.read_bytes())
        reader = threading.Thread(target=infer)
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive(), "the reader must wait for the writer"
        dst.calib.write_bytes(src.calib.read_bytes())
    reader.join(timeout=60)
    assert not isinstance(outcome.get("error"), CalibrationMissingError), outcome.get("error")
    assert outcome["result"].threshold == new_threshold  # type: ignore[attr-defined]


def test_a_second_writer_times_out_with_a_storage_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with model_lock.writing(store, REF):
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with model_lock.writing(store, REF, timeout_s=0.2):
                    pass
            except StorageError as exc:
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=10)
    assert errors and "timed out" in str(errors[0])


def test_reader_of_a_model_that_does_not_exist_takes_no_lock_and_creates_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with model_lock.reading(store, REF):
        pass
    assert not (tmp_path / "models").exists()


def _wait_until(condition: Callable[[], bool], *, deadline_s: float, proc: subprocess.Popen[bytes]) -> bool:
    """Poll ``condition`` until it holds or the deadline passes; stop early when ``proc`` has exited."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.2)
    return condition()


def _served_version(served: Path) -> int | None:
    lineage = read_lineage(ModelStore(served), REF)
    return lineage.registered_version if lineage is not None else None


def _status_versions(served: Path) -> list[tuple[str, int]] | None:
    status = read_status(served)
    return None if status is None else [(m["name"], m["version"]) for m in status["models"]]


def test_bdi_sync_watch_follows_a_promotion_made_while_it_runs_until_sigterm(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    # a watcher that syncs once and exits serves v1 forever: the promotion below must reach the models dir
    from tests.helpers.servers import clean_env

    tracking = _tracking("watch", project_root)
    registered = register(tracking, model_dir=exports[0], ref=REF)
    served = tmp_path / "served"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bdi.cli", "sync", "--watch", "--interval", "0.5", "--models-dir", str(served),
         "--project-root", str(project_root), "--prefix", "watch"],
        env=clean_env(BDI_GUI_LOG_DIR=str(tmp_path / "logs")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert _wait_until(lambda: _served_version(served) == 1, deadline_s=120, proc=proc)
        assert _fingerprint(served) == _fingerprint(exports[0])
        # the status file is written when the round ends, just after its models are in place
        assert _wait_until(lambda: _status_versions(served) == [(registered.name, 1)], deadline_s=30, proc=proc), \
            read_status(served)

        register(tracking, model_dir=exports[1], ref=REF, move_alias=False)
        _client(tracking).set_registered_model_alias(registered.name, "champion", "2")
        promoted = _wait_until(lambda: _served_version(served) == 2, deadline_s=60, proc=proc)
        assert promoted, f"still serving v{_served_version(served)}; watcher exit code {proc.poll()}"
        assert _fingerprint(served) == _fingerprint(exports[1])
        assert _wait_until(lambda: _status_versions(served) == [(registered.name, 2)], deadline_s=30, proc=proc), \
            read_status(served)
        assert proc.poll() is None, "the watcher must keep running until SIGTERM"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert b"following the registry" in out


def test_a_broken_version_is_reported_and_does_not_stop_the_other_models(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    tracking = _tracking("isolate", project_root)
    registered = register(tracking, model_dir=exports[0], ref=REF)
    client = _client(tracking)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    client.create_registered_model("isolate.broken")
    client.create_model_version("isolate.broken", source=empty.as_uri())
    client.set_registered_model_alias("isolate.broken", "champion", "1")
    served = tmp_path / "served"
    RegistryFollower(tracking=tracking, models_dir=served, interval_s=0).run()
    health = SyncStatusReader(served, following=True, alias="champion", interval_s=0).health()
    assert [m["name"] for m in health["synced"]] == [registered.name]
    assert len(health["failed"]) == 1 and health["failed"][0].startswith("isolate.broken v1: ")
    assert health["reachable"] is True
    assert _fingerprint(served) == _fingerprint(exports[0])


def test_a_promoted_version_that_cannot_be_synced_leaves_the_old_one_served_and_listed(
    project_root: Path, exports: tuple[Path, Path], tmp_path: Path
) -> None:
    tracking = _tracking("keepold", project_root)
    registered = register(tracking, model_dir=exports[0], ref=REF)
    served = tmp_path / "served"
    RegistryFollower(tracking=tracking, models_dir=served, interval_s=0).run()
    client = _client(tracking)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    client.create_model_version(registered.name, source=empty.as_uri())
    client.set_registered_model_alias(registered.name, "champion", "2")
    RegistryFollower(tracking=tracking, models_dir=served, interval_s=0).run()
    health = SyncStatusReader(served, following=True, alias="champion", interval_s=0).health()
    assert [(m["name"], m["version"]) for m in health["synced"]] == [(registered.name, 1)]
    assert [f.split(":")[0] for f in health["failed"]] == [f"{registered.name} v2"]
    assert _fingerprint(served) == _fingerprint(exports[0])
