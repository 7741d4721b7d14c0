"""Calibrate: besides the threshold, the stage reports the tuning selection metrics of the calib split.

One module-scoped project (the synthetic discs, ``model=tiny``, MLflow on SQLite in ``tmp_path``) runs ingest,
fit_ok and calibrate in process, as ``python -m pipelines.<stage>`` would with conf/ and these overrides.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bdi.data.metrics import image_auroc
from bdi.data.synthetic import write_mvtec_dataset
from pipelines import calibrate, fit_ok, ingest
from pipelines.config import compose_config, to_plain, validate
from pipelines.manifest import read_manifest
from pipelines.stage import StageContext


@dataclass
class CalibratedProject:
    root: Path
    outcomes: list[calibrate.CalibrationOutcome]

    def metrics_file(self) -> dict[str, Any]:
        return json.loads((self.root / "eval" / "calib_metrics.json").read_text(encoding="utf-8"))


def _context(root: Path, stage: str) -> StageContext:
    overrides = ["dataset=synthetic", f"dataset.source={root / 'mvtec'}", "model=tiny"]
    cfg = validate(to_plain(compose_config(overrides)))
    return StageContext(stage=stage, cfg=cfg, config_dict=to_plain(cfg), project_root=root, config_source="conf/",
                        overrides=tuple(overrides))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CalibratedProject]:
    root = tmp_path_factory.mktemp("calibrate-project")
    write_mvtec_dataset(root / "mvtec", n_train=8, n_test_good=4, n_test_per_defect=2, size=96, seed=0)
    ingest.execute(_context(root, "ingest"))
    fit_ok.execute(_context(root, "fit_ok"))
    yield CalibratedProject(root=root, outcomes=calibrate.execute(_context(root, "calibrate")))


def test_calibrate_reports_image_auroc_of_the_calib_split(project: CalibratedProject) -> None:
    [outcome] = project.outcomes
    calib_files = {r.file for r in read_manifest(project.root / "data" / "manifest.csv") if r.split == "calib"}
    assert {s["file"] for s in outcome.scores} == calib_files
    expected = image_auroc([s["label"] == "ng" for s in outcome.scores], [s["score"] for s in outcome.scores])
    assert outcome.selection["calib_image_auroc"] == pytest.approx(expected)


def test_calibrate_reports_pixel_auroc_where_the_rows_have_masks(project: CalibratedProject) -> None:
    value = project.outcomes[0].selection["calib_pixel_auroc"]
    assert value is not None and 0.0 <= value <= 1.0


def test_the_calibration_stores_the_ok_rows_as_the_drift_reference(project: CalibratedProject) -> None:
    [outcome] = project.outcomes
    reference = outcome.calib.reference
    assert reference is not None and set(reference) == {"score", "brightness", "contrast", "sharpness"}
    ok_scores = sorted(s["score"] for s in outcome.scores if s["label"] == "ok")
    assert list(reference["score"]) == pytest.approx(ok_scores, rel=1e-6)
    assert len(reference["sharpness"]) == len(ok_scores) and min(reference["sharpness"]) > 0


def test_calibrate_writes_the_selection_metrics_file(project: CalibratedProject) -> None:
    [outcome] = project.outcomes
    metrics = project.metrics_file()
    assert metrics["models"] == {"synthetic/disc/ring": outcome.selection}
    assert metrics["calib_image_auroc"] == pytest.approx(outcome.selection["calib_image_auroc"])
    assert metrics["calib_pixel_auroc"] == pytest.approx(outcome.selection["calib_pixel_auroc"])


def test_calibrate_logs_the_selection_metrics_to_mlflow(project: CalibratedProject) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bdi")
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'calibrate'")
    selection = project.outcomes[0].selection
    assert run.data.metrics["calib/image_auroc"] == pytest.approx(selection["calib_image_auroc"])
    assert run.data.metrics["calib/pixel_auroc"] == pytest.approx(selection["calib_pixel_auroc"])
    assert "calib/threshold" in run.data.metrics


def test_stage_runs_nest_under_one_parent_run_with_the_comparison_row(project: CalibratedProject) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bdi")
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.pipeline = 'true'")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == {"ingest", "fit_ok", "calibrate"}
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("manual@")
    [outcome] = project.outcomes
    metrics = parent.data.metrics  # the comparison row only (no evaluate stage here): MLflow's compare box shows it
    assert set(metrics) == {"calib/threshold", "calib/false_reject_rate", "calib/escape_rate"}
    assert metrics["calib/threshold"] == pytest.approx(outcome.calib.threshold)
    [calibrate] = [c for c in children if c.data.tags["stage"] == "calibrate"]  # every figure, on the stage's run
    assert calibrate.data.metrics["calib/image_auroc"] == pytest.approx(outcome.selection["calib_image_auroc"])
    assert {"calib/threshold", "calib/ok_score_at_percentile", "calib/ng_score_at_percentile"} <= set(
        calibrate.data.metrics)
    assert not {"p99_ok", "p5_ng", "calib/p99_ok", "calib/p5_ng"} & set(calibrate.data.metrics)
    params = parent.data.params  # resolved: the backbone's defaults, never "None" where one was applied
    assert params["model.scoring.score_percentile"] == str(outcome.calib.score_percentile) != "None"
    assert params["threshold.ok_percentile"] == str(outcome.calib.score_percentile)
    assert params["threshold.ng_percentile"] == "5.0" and "threshold.rule" in params


def test_calibrate_sets_the_band_from_the_ng_images_and_logs_it(project: CalibratedProject) -> None:
    from mlflow import MlflowClient

    [outcome] = project.outcomes
    band = outcome.calib.band
    assert band is not None, "the calib split has NG images: the band is on by default"
    ok = [s["score"] for s in outcome.scores if s["label"] == "ok"]
    ng = [s["score"] for s in outcome.scores if s["label"] == "ng"]
    assert band.threshold_low <= band.threshold_high
    assert sum(s < band.threshold_low for s in ng) == 0  # escape budget 0
    assert sum(s >= band.threshold_high for s in ok) <= 0.05 * len(ok)  # false-reject budget 5 %
    in_band = sum(band.threshold_low <= s < band.threshold_high for s in ok + ng)
    assert band.review_rate == pytest.approx(in_band / len(ok + ng))
    stored = json.loads(next((project.root / "artifacts" / "model").rglob("*_calib.json")).read_text())
    assert (stored["threshold_low"], stored["threshold_high"]) == (band.threshold_low, band.threshold_high)
    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bdi")
    # the band's figures are on the calibrate stage's run (the parent keeps the six-row comparison row)
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'calibrate'")
    metrics = run.data.metrics
    assert metrics["calib/threshold_low"] == pytest.approx(band.threshold_low)
    assert metrics["calib/threshold_high"] == pytest.approx(band.threshold_high)
    assert metrics["calib/review_rate"] == pytest.approx(band.review_rate)
    assert metrics["calib/band_escape_rate"] == 0.0 and "calib/band_false_reject_rate" in metrics
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.pipeline = 'true'")
    assert parent.data.params["band.escape_budget"] == "0.0"  # the band's budgets: params of the comparison row


def test_evaluate_reports_where_the_band_sends_the_eval_split() -> None:
    from bdi.patchcore.calibration import Band, Calibration
    from pipelines.evaluate import band_metrics

    band = Band(threshold_low=2.0, threshold_high=3.0, escape_budget=0.0, false_reject_budget=0.05, collapsed=False)
    calib = Calibration(threshold=2.5, score_percentile=100, area_mm2_thr=1.0, memory_fingerprint="f", band=band)
    values = band_metrics(calib, ok_scores=[1.0, 2.5, 3.5], ng_scores=[1.5, 2.2, 4.0, 5.0])
    assert values["review_rate"] == pytest.approx(2 / 7)  # OK 2.5, NG 2.2
    assert values["band_escape_rate"] == pytest.approx(1 / 4)  # NG 1.5
    assert values["band_false_reject_rate"] == pytest.approx(1 / 3)  # OK 3.5
    single = Calibration(threshold=2.5, score_percentile=100, area_mm2_thr=1.0, memory_fingerprint="f")
    assert band_metrics(single, ok_scores=[1.0], ng_scores=[5.0]) == {"review_rate": 0.0}
