"""Registry round trip on a real MLflow (SQLite + local artefacts in a temp dir) and the tiny real model."""

from __future__ import annotations

from pathlib import Path

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from bdi.errors import InvalidInputError
from bdi.mlops.registration import RegistrationResult, export_model_dir, register_model, registered_model_name
from bdi.mlops.registry_sync import sync_registered
from bdi.mlops.tracking import TrackingConfig, TrackingTarget, tracked_run
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore

REF = ModelRef.create(recipe_id="line-a", role_id="Inspection", roi_id="disc 1/ä", model_key=None)


@pytest.fixture(scope="module")
def project_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded MLflow for the module; each test isolates itself with its own name prefix."""
    return tmp_path_factory.mktemp("project")


@pytest.fixture(autouse=True)
def no_stray_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run in an empty cwd and fail if MLflow fell back to its default store (./mlflow.db, ./mlruns)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert sorted(p.name for p in cwd.iterdir()) == []


def _tracking(prefix: str, project_root: Path) -> TrackingTarget:
    return TrackingConfig(experiment="unit-registry", registered_model_prefix=prefix).resolve(project_root)


def _fit_and_export(
    service: InspectionService, *, fit_on: list[np.ndarray], ok: list[np.ndarray], ng: list[np.ndarray], dest: Path
) -> Path:
    """Fit + calibrate ``REF`` with the real service, then export it alone into ``dest``."""
    service.fit_images(ref=REF, mm_per_px=0.2, images=fit_on)
    scores = [r.score for r in service.score_images(ref=REF, images=ok + ng)]
    service.calibrate_from_scores(ref=REF, ok_scores=scores[: len(ok)], ng_scores=scores[len(ok):])
    export_model_dir(store=ModelStore(service.settings.models_dir), ref=REF, dest=dest)
    return dest


def _register(tracking: TrackingTarget, model_dir: Path, auroc: float) -> RegistrationResult:
    with tracked_run(tracking, run_name="register") as run:
        return register_model(tracking=tracking, run_id=run.run_id, model_dir=model_dir,
                              ref=REF, metrics={"image_auroc": auroc, "pixel_auroc": 0.5},
                              tags={"dvc_params_hash": "abc123"})


@pytest.fixture()
def model_dir(service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray],
              tmp_path: Path) -> Path:
    return _fit_and_export(service, fit_on=good_discs[:10], ok=good_discs[10:], ng=defect_discs,
                           dest=tmp_path / "export-1")


def _client(project_root: Path) -> MlflowClient:
    uri = TrackingConfig().resolve(project_root).tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_registered_model_name_is_mlflow_safe_and_keeps_similar_ids_apart() -> None:
    a = registered_model_name("bdi", recipe_id="default", role_id="Inspection", roi_id="disc 1/ä")
    b = registered_model_name("bdi", recipe_id="default", role_id="Inspection", roi_id="disc-1-ä")
    assert a == registered_model_name("bdi", recipe_id="default", role_id="Inspection", roi_id="disc 1/ä")
    assert a != b
    assert a.startswith("bdi.default.Inspection.disc-1.")
    assert not set(a) & set("/:@ ")


def test_alias_stays_on_the_better_version_when_a_worse_one_registers(
    project_root: Path, model_dir: Path
) -> None:
    tracking = _tracking("alias", project_root)
    first = _register(tracking, model_dir, auroc=0.9)
    second = _register(tracking, model_dir, auroc=0.8)
    assert (first.version, first.alias_moved, first.previous_version) == (1, True, None)
    assert (second.version, second.alias_moved, second.previous_version) == (2, False, 1)
    client = _client(project_root)
    holder = client.get_model_version_by_alias(first.name, "champion")
    assert int(holder.version) == 1
    assert holder.tags["metric.image_auroc"] == "0.9"
    assert holder.tags["dvc_params_hash"] == "abc123"
    assert holder.tags["roi_id"] == REF.roi_id
    assert holder.tags["weights_name"].startswith("vit_small_patch14_dinov2(random")


def test_register_rejects_a_missing_primary_metric(project_root: Path, model_dir: Path) -> None:
    tracking = _tracking("nometric", project_root)
    with tracked_run(tracking, run_name="register") as run:
        with pytest.raises(InvalidInputError, match="image_auroc"):
            register_model(tracking=tracking, run_id=run.run_id, model_dir=model_dir,
                           ref=REF, metrics={"pixel_auroc": 0.7}, tags={})


def test_sync_writes_the_exact_store_files_and_is_idempotent(
    project_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    tracking = _tracking("sync", project_root)
    _register(tracking, model_dir, auroc=0.9)
    served = tmp_path / "served"
    [synced] = sync_registered(tracking=tracking, models_dir=served)
    src, dst = ModelStore(model_dir).paths(REF), ModelStore(served).paths(REF)
    assert synced.written == ("index", "memory", "calib")
    for a, b in ((src.index, dst.index), (src.memory, dst.memory), (src.calib, dst.calib)):
        assert b.read_bytes() == a.read_bytes()
    loaded = ModelStore(served).load_model(REF)
    assert loaded is not None and loaded.index is not None
    assert loaded.memory.fingerprint == synced.fingerprint
    assert ModelStore(served).calibrations.document(REF) == ModelStore(model_dir).calibrations.document(REF)
    assert sync_registered(tracking=tracking, models_dir=served) == []
    assert not [p for p in served.iterdir() if p.name.startswith(".sync-")]


def test_sync_follows_the_alias_to_a_better_version(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray],
    project_root: Path, model_dir: Path, tmp_path: Path,
) -> None:
    tracking = _tracking("resync", project_root)
    _register(tracking, model_dir, auroc=0.8)
    served = tmp_path / "served"
    [first] = sync_registered(tracking=tracking, models_dir=served)
    refit = _fit_and_export(service, fit_on=good_discs[2:12], ok=good_discs[:2], ng=defect_discs,
                            dest=tmp_path / "export-2")
    better = _register(tracking, refit, auroc=0.95)
    [second] = sync_registered(tracking=tracking, models_dir=served)
    assert better.alias_moved and second.version == better.version == 2
    assert second.fingerprint != first.fingerprint
    loaded = ModelStore(served).load_model(REF)
    assert loaded is not None and loaded.memory.fingerprint == second.fingerprint


def test_pyfunc_from_the_alias_scores_an_image_path_like_the_service(
    service: InspectionService, good_discs: list[np.ndarray], defect_discs: list[np.ndarray],
    project_root: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracking = _tracking("pyfunc", project_root)
    registered = _register(tracking, model_dir, auroc=0.9)
    paths = []
    for name, image in (("good.png", good_discs[11]), ("defect.png", defect_discs[0])):
        paths.append(str(tmp_path / name))
        assert cv2.imwrite(paths[-1], image)
    uri = tracking.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{registered.name}@champion")
    out = model.predict(pd.DataFrame({"image_path": paths}))
    expected = [r.score for r in service.score_images(ref=REF, images=[good_discs[11], defect_discs[0]])]
    assert list(out.columns) == ["score", "threshold", "decision"]
    assert out["score"].tolist() == pytest.approx(expected, rel=1e-4)
    assert out["score"][1] > out["score"][0]
    assert set(out["decision"]) <= {"ok", "ng"}


def test_cli_sync_materialises_the_champion_into_the_models_dir(
    project_root: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bdi.cli import main

    tracking = _tracking("cli", project_root)
    registered = _register(tracking, model_dir, auroc=0.9)
    served = tmp_path / "served"
    code = main(["sync", "--models-dir", str(served), "--project-root", str(project_root), "--prefix", "cli"])
    assert code == 0
    assert f"synced {registered.name} v1" in capsys.readouterr().out
    assert ModelStore(served).load_model(REF) is not None


def test_sync_copies_the_export_a_version_carries_into_the_export_cache(
    service: InspectionService, project_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    from bdi.config import EXPORTS_DIRNAME
    from bdi.runtime.export import load_export
    from bdi.runtime.select import export_checked

    export, _ = export_checked(service.extractor, root=model_dir / EXPORTS_DIRNAME, threads=1,
                               runtimes=["onnxruntime"])
    tracking = _tracking("carried", project_root)
    _register(tracking, model_dir, auroc=0.9)
    cache = tmp_path / "cache" / "exports"
    sync_registered(tracking=tracking, models_dir=tmp_path / "served", exports_root=cache)
    synced = load_export(cache / export.manifest.key, signature=service.extractor.signature())
    assert synced.manifest.files == export.manifest.files
    assert synced.manifest.parity["onnxruntime"]["passed"] is True


def test_a_version_without_an_export_syncs_and_serves(
    project_root: Path, model_dir: Path, tmp_path: Path, good_discs: list[np.ndarray]
) -> None:
    from tests.helpers.tiny import tiny_settings

    tracking = _tracking("noexport", project_root)
    _register(tracking, model_dir, auroc=0.9)
    served = tmp_path / "served"
    settings = tiny_settings(served, runtime="auto")
    sync_registered(tracking=tracking, models_dir=served, exports_root=settings.exports_dir())
    assert not settings.exports_dir().exists()
    server = InspectionService.from_settings(settings)
    ok, encoded = cv2.imencode(".png", good_discs[11])
    outcome = server.infer(ref=REF, mm_per_px=0.2, image=encoded.tobytes())
    assert outcome.decision in ("ok", "ng") and server.health()["runtime"] in ("torch", "onnxruntime", "openvino")


def test_pyfunc_scores_on_the_exported_runtime_when_asked_and_matches_torch(
    model_dir: Path, good_discs: list[np.ndarray], defect_discs: list[np.ndarray], tmp_path: Path
) -> None:
    from bdi.mlops.pyfunc import ModelDirPredictor

    images = [cv2.imencode(".png", image)[1].tobytes() for image in (good_discs[11], defect_discs[0])]
    frame = pd.DataFrame({"image_bytes": images})
    cache = str(tmp_path / "cache")
    on_torch = ModelDirPredictor(model_dir, overrides={"weights_cache_dir": cache})
    on_onnx = ModelDirPredictor(model_dir, overrides={"weights_cache_dir": cache, "runtime": "onnxruntime"})
    assert (on_torch.runtime.active, on_onnx.runtime.active) == ("torch", "onnxruntime")
    torch_scores = on_torch.predict_frame(frame)["score"].to_numpy()
    onnx_scores = on_onnx.predict_frame(frame)["score"].to_numpy()
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-3)
