"""Ingest: bad files are rejected with a reason and the rest kept; splits are deterministic; bad paths fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from bdi.data.synthetic import write_mvtec_dataset
from pipelines.config import PipelineConfig, PipelineConfigError, compose_config, to_plain, validate
from pipelines.ingest import run_ingest, write_outputs
from pipelines.manifest import MANIFEST_COLUMNS
from pipelines.sources import AUTO_MIN_OK, STAMP
from tests.helpers.synthetic import disc_png

N_TRAIN, N_GOOD, N_PER_DEFECT = 6, 4, 2
N_FILES = N_TRAIN + N_GOOD + 3 * N_PER_DEFECT


def _cfg(source: Path | str, *extra: str) -> PipelineConfig:
    overrides = ["dataset=synthetic", f"dataset.source={source}", "tracking.enabled=false", *extra]
    return validate(to_plain(compose_config(overrides)))


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    return write_mvtec_dataset(tmp_path / "mvtec", n_train=N_TRAIN, n_test_good=N_GOOD,
                               n_test_per_defect=N_PER_DEFECT, size=64, seed=3)


def _by_reason(result: object, word: str) -> list[dict[str, str]]:
    return [r for r in result.rejected if word in r["reason"]]  # type: ignore[attr-defined]


def test_ingest_keeps_every_valid_file_and_splits_them(dataset: Path, tmp_path: Path) -> None:
    result = run_ingest(_cfg(dataset), root=tmp_path)
    assert result.rejected == []
    assert result.source["used"] == "mvtec" and result.source["generator"] is None  # not generated: read as is
    assert not (dataset / STAMP).exists()
    assert len(result.rows) == N_FILES
    splits = Counter(r.split for r in result.rows)
    assert splits == {"train": N_TRAIN, "calib": N_GOOD // 2 + 3, "eval": N_GOOD // 2 + 3}
    for cls in ("pit", "scratch", "crack"):  # stratified: every class in both halves
        assert {r.split for r in result.rows if r.defect_class == cls} == {"calib", "eval"}
    ng = [r for r in result.rows if r.label == "ng"]
    assert all(r.mask.endswith("_mask.png") for r in ng)
    assert all(r.mm_per_px == pytest.approx(0.2) for r in result.rows)


def test_ingest_rejects_a_corrupt_image_and_keeps_the_rest(dataset: Path, tmp_path: Path) -> None:
    (dataset / "test" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    result = run_ingest(_cfg(dataset), root=tmp_path)
    bad = _by_reason(result, "corrupt image")
    assert [Path(r["file"]).name for r in bad] == ["001.png"]
    assert "cannot be decoded" in bad[0]["reason"]
    assert len(result.rows) == N_FILES - 1
    assert not any(r.file.endswith("test/good/001.png") for r in result.rows)


def test_ingest_rejects_an_image_mask_size_mismatch(dataset: Path, tmp_path: Path) -> None:
    mask_path = dataset / "ground_truth" / "pit" / "000_mask.png"
    cv2.imwrite(str(mask_path), np.zeros((40, 48), dtype=np.uint8))
    result = run_ingest(_cfg(dataset), root=tmp_path)
    bad = _by_reason(result, "size mismatch")
    assert len(bad) == 1 and bad[0]["file"].endswith("test/pit/000.png")
    assert "image is 64x64 px" in bad[0]["reason"] and "48x40 px" in bad[0]["reason"]
    assert len(result.rows) == N_FILES - 1


def test_ingest_rejects_small_images_and_duplicates(dataset: Path, tmp_path: Path) -> None:
    cv2.imwrite(str(dataset / "test" / "good" / "002.png"), np.zeros((16, 16, 3), dtype=np.uint8))
    (dataset / "test" / "good" / "003.png").write_bytes((dataset / "train" / "good" / "000.png").read_bytes())
    result = run_ingest(_cfg(dataset), root=tmp_path)
    assert [Path(r["file"]).name for r in _by_reason(result, "too small")] == ["002.png"]
    dup = _by_reason(result, "duplicate")
    assert len(dup) == 1 and "train/good/000.png" in dup[0]["reason"]


def test_ingest_writes_manifest_and_report(dataset: Path, tmp_path: Path) -> None:
    (dataset / "test" / "good" / "001.png").write_bytes(b"garbage")
    cfg = _cfg(dataset)
    result = run_ingest(cfg, root=tmp_path)
    manifest, report = write_outputs(result, cfg=cfg, root=tmp_path)
    frame = pd.read_csv(manifest, keep_default_na=False)
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert len(frame) == N_FILES - 1
    assert frame["sha256"].str.len().eq(64).all()
    body = json.loads(report.read_text())
    assert body["n_rejected"] == 1 and body["n_kept"] == N_FILES - 1
    assert "corrupt image" in body["rejected"][0]["reason"]


def test_manifest_paths_are_relative_to_the_project_root(dataset: Path, tmp_path: Path) -> None:
    result = run_ingest(_cfg("mvtec"), root=tmp_path)
    assert result.rows[0].file.startswith("mvtec/train/good/")


def test_splits_do_not_depend_on_file_names(dataset: Path, tmp_path: Path) -> None:
    before = {r.sha256: r.split for r in run_ingest(_cfg(dataset), root=tmp_path).rows}
    for path in sorted((dataset / "test" / "good").glob("*.png")):
        path.rename(path.with_name(f"renamed_{path.name}"))
    after = {r.sha256: r.split for r in run_ingest(_cfg(dataset), root=tmp_path).rows}
    assert before == after


def test_ingest_splits_as_the_library_rule_does(dataset: Path, tmp_path: Path) -> None:
    """One home for the rule: the manifest's splits are ``bdi.data.splits.split_mvtec``'s (the benchmark's)."""
    from bdi.data.mvtec import read_mvtec
    from bdi.data.splits import split_mvtec

    items = read_mvtec(dataset)
    library = {it.path.resolve(): s for it, s in zip(items, split_mvtec(items, calib_fraction=0.5), strict=True)}
    rows = run_ingest(_cfg(dataset), root=tmp_path).rows
    assert {(tmp_path / r.file).resolve(): r.split for r in rows} == library


def test_missing_dataset_path_names_the_folder_and_the_overrides(tmp_path: Path) -> None:
    cfg = validate(to_plain(compose_config(["dataset=magnetic_tile", "dataset.source=nowhere/tiles"])))
    with pytest.raises(PipelineConfigError, match="dataset.source") as info:
        run_ingest(cfg, root=tmp_path)
    text = str(info.value)
    assert "folder 'nowhere/tiles' does not exist" in text and str(tmp_path / "nowhere" / "tiles") in text
    assert "dvc exp run -S dataset.source=/path/to/folder" in text and "dvc exp run -S dataset=synthetic" in text
    assert "python -m pipelines.ingest dataset.source=" in text
    assert not (tmp_path / "nowhere").exists()


def test_folder_without_mvtec_layout_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    cfg = validate(to_plain(compose_config(["dataset=magnetic_tile", f"dataset.source={tmp_path / 'flat'}"])))
    with pytest.raises(PipelineConfigError, match="dataset.source"):
        run_ingest(cfg, root=tmp_path)


def test_cli_bad_dataset_path_exits_non_zero_with_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", "dataset=magnetic_tile",
         f"dataset.source={tmp_path / 'nowhere'}", "tracking.enabled=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "error: ingest: dataset.source" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data").exists()


def test_server_source_reads_dataset_store_samples(tmp_path: Path) -> None:
    from bdi.refs import DatasetRef
    from bdi.storage.datasets import DatasetStore, UploadItem

    models = tmp_path / "models"
    store = DatasetStore(models)
    ref = DatasetRef(recipe_id="default", role_id="disc", roi_id="ring")
    store.save(ref, "ok", [UploadItem(data=disc_png(seed=i, size=64), client_filename=f"ok{i}.png",
                                      meta={"mm_per_px": 0.25}) for i in range(6)])
    store.save(ref, "ng", [UploadItem(data=disc_png(seed=10 + i, size=64, defect="pit"),
                                      client_filename=f"ng{i}.png", meta={}) for i in range(2)])
    cfg = validate(to_plain(compose_config([
        "dataset=server", f"dataset.source={models}", "tracking.enabled=false",
        "dataset.rois=[{role: disc, roi: ring}]",
    ])))
    result = run_ingest(cfg, root=tmp_path)
    assert result.rejected == []
    splits = Counter((r.label, r.split) for r in result.rows)
    assert splits == {("ok", "train"): 3, ("ok", "calib"): 2, ("ok", "eval"): 1, ("ng", "calib"): 1,
                      ("ng", "eval"): 1}
    assert {r.mm_per_px for r in result.rows if r.label == "ok"} == {0.25}
    assert {r.mm_per_px for r in result.rows if r.label == "ng"} == {0.2}  # the dataset default



def test_server_source_reads_the_samples_operator_feedback_made(tmp_path: Path) -> None:
    """Issue 27: a false reject and a missed defect, given as feedback on recorded inspections, are OK and NG samples
    that the ``server`` ingest reads like any upload, with the inspection's scale."""
    import hashlib
    from dataclasses import replace

    from bdi.config import Settings
    from bdi.monitoring.record import InspectionLog, RecordPolicy, inspections_dir
    from bdi.service.context import ServiceContext
    from bdi.service.feedback import FeedbackRequest, give_feedback
    from bdi.storage.datasets import DatasetStore
    from bdi.storage.store import ModelStore
    from tests.unit.test_inspection_record import _record

    models = tmp_path / "models"
    settings = Settings(models_dir=models)
    ctx = ServiceContext(settings=settings, extractor=None, store=ModelStore(models),  # type: ignore[arg-type]
                         datasets=DatasetStore(models))
    log = InspectionLog(inspections_dir(models), RecordPolicy(store_images=True))
    for i, decision in enumerate(["ng"] * 5 + ["ok"] * 2):
        image = disc_png(seed=i, size=64, defect=None if decision == "ng" else "pit")
        sha = hashlib.sha256(image).hexdigest()
        log.append(replace(_record(i, roi="ring", decision=decision), role_id="disc", model_key="ring",
                           mm_per_px=0.25, image_sha256=sha,
                           image_file=log.store_image(image, sha256=sha, suffix=".png")))
    log.close()
    for i in range(7):
        give_feedback(ctx, FeedbackRequest(recipe_id="default", request_id=f"req-{i}",
                                           verdict="false_reject" if i < 5 else "missed_defect"))
    cfg = validate(to_plain(compose_config([
        "dataset=server", f"dataset.source={models}", "tracking.enabled=false",
        "dataset.rois=[{role: disc, roi: ring}]",
    ])))
    result = run_ingest(cfg, root=tmp_path)
    assert result.rejected == []
    assert Counter(r.label for r in result.rows) == {"ok": 5, "ng": 2}
    assert {r.mm_per_px for r in result.rows} == {0.25}


SMALL_SYNTHETIC = ["dataset.synthetic.n_train=4", "dataset.synthetic.n_test_good=2",
                   "dataset.synthetic.n_test_per_defect=2", "dataset.synthetic.size=64"]


def test_synthetic_kind_generates_seeded_discs_once_and_records_them(tmp_path: Path) -> None:
    cfg = _cfg("gen", *SMALL_SYNTHETIC)
    first = run_ingest(cfg, root=tmp_path)
    assert len(first.rows) == 4 + 2 + 3 * 2 and first.rejected == []
    assert first.source["used"] == "synthetic" and first.source["folder"] == "gen"
    generator = first.source["generator"]
    assert generator["generator"] == "bdi.data.synthetic.write_mvtec_dataset" and generator["seed"] == 0
    assert json.loads((tmp_path / "gen" / STAMP).read_text(encoding="utf-8")) == generator
    again = run_ingest(cfg, root=tmp_path)
    assert "reused" in again.source["note"] and [r.sha256 for r in again.rows] == [r.sha256 for r in first.rows]
    reseeded = run_ingest(_cfg("gen", *SMALL_SYNTHETIC, "dataset.synthetic.seed=1"), root=tmp_path)
    assert "regenerated" in reseeded.source["note"]
    assert {r.sha256 for r in reseeded.rows}.isdisjoint({r.sha256 for r in first.rows})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no temporary folder left


def _auto_cfg(models: Path) -> PipelineConfig:
    overrides = ["dataset=auto", f"dataset.source={models}", "dataset.synthetic.folder=discs", *SMALL_SYNTHETIC]
    return validate(to_plain(compose_config(overrides)))


def test_auto_generates_synthetic_discs_without_server_samples(tmp_path: Path) -> None:
    result = run_ingest(_auto_cfg(tmp_path / "models"), root=tmp_path)
    assert result.source["used"] == "synthetic" and result.source["folder"] == "discs"
    assert "fewer than" in result.source["note"] and not (tmp_path / "models").exists()
    assert {r.recipe for r in result.rows} == {"default"} and len(result.rows) == 4 + 2 + 3 * 2


def test_auto_reads_the_server_samples_when_every_model_has_enough(tmp_path: Path) -> None:
    from bdi.refs import DatasetRef
    from bdi.storage.datasets import DatasetStore, UploadItem

    models = tmp_path / "models"
    store = DatasetStore(models)
    ref = DatasetRef(recipe_id="default", role_id="default", roi_id="default")
    store.save(ref, "ok", [UploadItem(data=disc_png(seed=i, size=64), client_filename=f"ok{i}.png", meta={})
                           for i in range(AUTO_MIN_OK)])
    store.save(ref, "ng", [UploadItem(data=disc_png(seed=20, size=64, defect="pit"), client_filename="ng.png",
                                      meta={})])
    result = run_ingest(_auto_cfg(models), root=tmp_path)
    assert result.source["used"] == "server" and result.source["generator"] is None
    assert Counter(r.label for r in result.rows) == {"ok": AUTO_MIN_OK, "ng": 1}
    assert not (tmp_path / "discs").exists()
