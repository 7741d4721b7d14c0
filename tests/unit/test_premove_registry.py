"""A model registered by the code before issue 24's move (flat ``bdi.*`` modules, commit b71a56d) still loads
and serves with today's code: the registry's pickled reference ``bdi.registry.BdiPyfuncModel`` resolves, it
scores as it did when it was registered, and syncing it gives a models dir the service infers with.

The fixture ``tests/fixtures/premove_registry`` (an embedded MLflow store: ``mlflow.db`` + ``mlartifacts/``) was
made once by ``tests/fixtures/make_premove_registry.py`` run with the pre-move commit."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from bdi.mlops.registry_sync import sync_registry
from bdi.mlops.tracking import TrackingConfig
from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.lineage import read_lineage
from tests.helpers.synthetic import make_disc, png_bytes
from tests.helpers.tiny import tiny_settings

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "premove_registry"
REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _relocate(db: Path, old: str, new: str) -> int:
    """Rewrite the absolute root ``old`` that MLflow stored (experiment artifact location, run artifact URI,
    logged-model location, version source/storage location) to ``new`` in every text column of ``db``."""
    changed = 0
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if "CHAR" in kind.upper() or "TEXT" in kind.upper():
                    changed += con.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                                           f'WHERE "{column}" LIKE ?', (old, new, f"%{old}%")).rowcount
    return changed


@pytest.fixture()
def premove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any]]:
    """The fixture store copied into ``tmp_path`` with its recorded root rewritten; MLflow pointed at it."""
    info = json.loads((FIXTURE / "premove.json").read_text(encoding="utf-8"))
    root = tmp_path / "project"
    shutil.copytree(FIXTURE, root)
    assert _relocate(root / "mlflow.db", info["project_root"], str(root)) >= 3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TrackingConfig().resolve(root).tracking_uri)
    return root, info


def _scored_discs() -> list[np.ndarray]:
    """The discs the generator scored when it calibrated (good 11-12 of seed 0, the three defects of seed 1)."""
    rng = np.random.default_rng(0)
    good = [make_disc(size=96, rng=rng).image for _ in range(12)]
    rng = np.random.default_rng(1)
    bad = [make_disc(size=96, defect=kind, rng=rng).image for kind in ("pit", "scratch", "crack")]
    return good[10:] + bad


def test_premove_version_loads_by_its_pickled_name_and_scores_as_when_registered(
    premove: tuple[Path, dict[str, Any]],
) -> None:
    _, info = premove
    model = mlflow.pyfunc.load_model(f"models:/{info['registered_model']}/{info['version']}")
    assert type(model.unwrap_python_model()).__module__ == "bdi.registry"
    images = _scored_discs()
    out = model.predict(pd.DataFrame({"image_bytes": [png_bytes(image) for image in images]}))
    assert list(out.columns) == ["score", "threshold", "decision"]
    assert out["score"].tolist() == pytest.approx(info["fit_scores"]["ok"] + info["fit_scores"]["ng"], rel=1e-4)
    assert out["decision"].tolist() == ["ok", "ok", "ng", "ng", "ng"]


def test_premove_champion_synced_into_a_models_dir_serves_infer(
    premove: tuple[Path, dict[str, Any]], tmp_path: Path, tiny_extractor: FeatureExtractor,
) -> None:
    root, info = premove
    models = tmp_path / "served"
    report = sync_registry(tracking=TrackingConfig(registered_model_prefix=info["prefix"]).resolve(root),
                           models_dir=models)
    assert not report.failed and [(m.name, m.version) for m in report.changed] == [
        (info["registered_model"], info["version"])]
    service = InspectionService(settings=tiny_settings(models), extractor=tiny_extractor)
    lineage = read_lineage(service.store, REF)
    assert lineage is not None and lineage.registered_version == info["version"]
    images = _scored_discs()
    good = service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(images[0]))
    bad = service.infer(ref=REF, mm_per_px=0.2, image=png_bytes(images[-1]))
    assert (good.decision, bad.decision) == ("ok", "ng")
    assert good.result.score == pytest.approx(info["fit_scores"]["ok"][0], rel=1e-4)
