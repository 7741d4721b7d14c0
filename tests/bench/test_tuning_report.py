"""The tuning report reads pipeline executions from a real MLflow (SQLite in tmp_path) and picks on calib only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.tuning_report import main

BASE = {"model.features.input_size": "None", "model.scoring.blur_sigma": "None", "paths.manifest": "a.csv"}


def _execution(client: object, experiment_id: str, *, config: str, params: dict[str, str],
               calib: tuple[float, float], evaluated: tuple[float, float], legacy: bool = False) -> None:
    stage_metrics = {  # the names the stages log (pipelines.calibrate, evaluate, fit_ok)
        "fit_ok": {"fit/timings_ms.encode": 2000.0, "fit/timings_ms.coreset": 500.0},
        "calibrate": {"calib/image_auroc": calib[0], "calib/pixel_auroc": calib[1], "calib/threshold": 1.0},
        "evaluate": {"eval/image_auroc": evaluated[0], "eval/pixel_auroc": evaluated[1],
                     "eval/tile/surface/crack.image_auroc": 0.0},
    }
    if legacy:  # the names of the first tuning round's runs
        stage_metrics = {
            "fit_ok": {"timings_ms.encode": 2000.0, "timings_ms.coreset": 500.0},
            "calibrate": {"calib_image_auroc": calib[0], "calib_pixel_auroc": calib[1], "threshold": 1.0},
            "evaluate": {"image_auroc": evaluated[0], "pixel_auroc": evaluated[1]},
        }
    for stage, metrics in stage_metrics.items():
        run = client.create_run(experiment_id, tags={"stage": stage, "config_hash": config})  # type: ignore[attr-defined]
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)  # type: ignore[attr-defined]
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)  # type: ignore[attr-defined]
        client.set_terminated(run.info.run_id)  # type: ignore[attr-defined]


@pytest.fixture()
def tracking_uri(tmp_path: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("bdi", artifact_location=str(tmp_path / "artifacts"))
    _execution(client, experiment_id, config="base", params=BASE, calib=(0.80, 0.70), evaluated=(0.80, 0.70))
    _execution(client, experiment_id, config="a", params={**BASE, "model.features.input_size": "384"},
               calib=(0.85, 0.71), evaluated=(0.99, 0.99))
    _execution(client, experiment_id, config="b",
               params={**BASE, "model.scoring.blur_sigma": "8.0", "paths.manifest": "b.csv"},
               calib=(0.85, 0.75), evaluated=(0.70, 0.60))
    return uri


def _table(tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["--tracking-uri", tracking_uri]) == 0
    return capsys.readouterr().out.splitlines()[2:]


def test_report_lists_only_the_params_that_differ_from_the_baseline(
    tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline, size, blur = _table(tracking_uri, capsys)
    assert baseline.startswith("| baseline | (defaults) | 0.800 | 0.700 | 0.800 | 0.700 | 2.5 |")
    assert "`model.features.input_size=384`" in size and "blur_sigma" not in size
    assert "`model.scoring.blur_sigma=8.0`" in blur and "paths.manifest" not in blur


def test_report_picks_the_best_calib_image_auroc_with_pixel_as_tie_break_never_eval(
    tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _table(tracking_uri, capsys)
    [best] = [r for r in rows if "(winner)" in r]
    assert "blur_sigma=8.0" in best and "**0.850** | **0.750**" in best


def test_report_reads_runs_logged_with_the_first_rounds_unprefixed_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("bdi", artifact_location=str(tmp_path / "artifacts"))
    _execution(client, experiment_id, config="old", params=BASE, calib=(0.80, 0.70), evaluated=(0.75, 0.65),
               legacy=True)
    [row] = _table(uri, capsys)
    assert row.startswith("| **baseline** (winner) | (defaults) | **0.800** | **0.700** | 0.750 | 0.650 | 2.5 |")
