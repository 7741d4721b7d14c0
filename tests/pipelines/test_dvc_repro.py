"""End to end: ``dvc repro`` in a fresh git+DVC repo on a tiny synthetic set, registry → sync → server.

One module-scoped project runs the pipeline once; the tests then check what it produced, that a second
``dvc repro`` reruns only ingest (always_changed) and nothing after it, and (last) that ``dvc exp run -S
model.memory.coreset_rate=0.05`` (DVC's own Hydra composition, no params writer of ours) re-runs fit_ok and what
follows only (besides ingest). The project copies this
repository's dvc.yaml, .dvc/config's hydra section, conf/, hydra_plugins/, pipelines/ and src/bdi (a
dependency that DVC hashes; the code imported is the installed ``bdi``), switches conf/'s defaults to
``dataset=synthetic`` and ``model=tiny`` (with a promotion gate that random weights can pass) and
regenerates params.yaml from them, as a developer would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bdi.data.synthetic import write_mvtec_dataset
from pipelines.execution import COMPARISON_METRICS
from tests.helpers.browser import chromium_or_skip, save_screenshot
from tests.helpers.servers import MlflowServer, UvicornServer, server_env

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STAGES = ("ingest", "fit_ok", "calibrate", "evaluate", "register")
DVC_TIMEOUT_S = 420
MM_PER_PX = 0.2
GATE = {"max_false_reject_rate": "1.0", "max_infer_latency_ms": "5000.0"}
CALIBRATIONS = ("calib-ng10", "calib-ng50-slowgate")  # the two experiments compared


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    first_run: str

    def run(self, *args: str, timeout: float = DVC_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"{args} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        return out

    def dvc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "dvc"), *args)

    @property
    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text(encoding="utf-8"))

    def path(self, key: str) -> Path:
        return self.root / self.params["paths"][key]

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "BDI_", "BRAKEDISC_", "MLFLOW_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "bdi-test")
    env.setdefault("GIT_AUTHOR_EMAIL", "bdi-test@example.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "bdi-test")
    env.setdefault("GIT_COMMITTER_EMAIL", "bdi-test@example.invalid")
    return env


def _regenerate_params(project: Project) -> None:
    project.run(sys.executable, "-m", "pipelines.config", "--write", "params.yaml")
    project.run(sys.executable, "-m", "pipelines.config", "--check", "params.yaml")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("dvc-project")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("conf", "pipelines", "hydra_plugins"):
        shutil.copytree(PROJECT / name, root / name, ignore=ignore)
    shutil.copytree(PROJECT / "src" / "bdi", root / "src" / "bdi", ignore=ignore)
    shutil.copy2(PROJECT / "dvc.yaml", root / "dvc.yaml")
    config = root / "conf" / "config.yaml"
    text = config.read_text(encoding="utf-8")
    text = re.sub(r"- dataset: \S+", "- dataset: synthetic", text)
    text, n = re.subn(r"\n  - model: \S+", "\n  - model: tiny", text)  # whatever conf/'s default model is
    assert n == 1
    for key, value in GATE.items():  # random weights: a permissive gate, parity still checked
        text, n = re.subn(rf"(\n  {key}:) [^\n]*", rf"\1 {value}", text)
        assert n == 1, key
    config.write_text(text, encoding="utf-8")
    (root / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/data/synthetic/\n", encoding="utf-8")
    project = Project(root=root, env=_env(), first_run="")
    _regenerate_params(project)
    params = project.params
    assert params["dataset"]["name"] == "synthetic" and params["model"]["features"]["weights"] == "random"
    write_mvtec_dataset(root / params["dataset"]["source"], n_train=8, n_test_good=4, n_test_per_defect=2,
                        size=96, seed=0)
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    shutil.copy2(PROJECT / ".dvc" / "config", root / ".dvc" / "config")  # hydra.enabled, as in this repository
    with (root / ".dvcignore").open("a", encoding="utf-8") as handle:
        handle.write("__pycache__/\n*.pyc\n")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "the code")  # the commit the versions' lineage names
    project.first_run = project.dvc("repro").stdout
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "pipeline run")  # the baseline of `dvc exp run`
    yield project


def test_first_repro_runs_every_stage(project: Project) -> None:
    assert _ran(project.first_run) == set(STAGES)
    assert not (project.root / "outputs").exists() and not (project.root / ".hydra").exists()


def test_metrics_json_holds_auroc(project: Project) -> None:
    metrics = json.loads(project.path("metrics").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    model = metrics["models"]["synthetic/disc/ring"]
    assert {"image_auroc", "pixel_auroc", "aupro", "f1", "false_reject_rate", "escape_rate"} <= set(model)
    assert set(model["per_class"]) == {"pit", "scratch", "crack"}
    shown = project.dvc("metrics", "show", "--json").stdout
    assert "image_auroc" in shown


def test_plots_and_reports_are_written(project: Project) -> None:
    assert project.path("roc").read_text(encoding="utf-8").startswith("model,fpr,tpr,threshold")
    assert project.path("score_hist").is_file()
    names = sorted(p.name for p in project.path("images_dir").glob("*.png"))
    assert names == ["synthetic__disc__ring_roc.png", "synthetic__disc__ring_scores.png",
                     "synthetic__disc__ring_worst.png"]
    report = json.loads(project.path("ingest_report").read_text(encoding="utf-8"))
    assert report["n_rejected"] == 0 and report["n_kept"] == 8 + 4 + 3 * 2


def test_stage_runs_are_logged_to_mlflow(project: Project) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.get_experiment_by_name("bdi")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    assert set(STAGES) <= set(by_stage)
    fit = by_stage["fit_ok"]
    assert fit.data.params["model.memory.coreset_rate"] == "0.1"
    assert fit.data.tags["config_source"] == "params.yaml" and fit.data.tags["dvc_stage"] == "fit_ok"
    assert "eval/image_auroc" in by_stage["evaluate"].data.metrics
    [parent] = [r for r in runs if r.data.tags.get("pipeline") == "true"]  # `dvc repro`: one execution
    assert parent.info.run_name.startswith("workspace@") and parent.info.status == "FINISHED"
    assert all(by_stage[s].data.tags["mlflow.parentRunId"] == parent.info.run_id for s in STAGES)


def test_model_version_is_registered_with_alias(project: Project) -> None:
    from mlflow import MlflowClient

    registration = json.loads(project.path("registration").read_text(encoding="utf-8"))
    record = registration["models"][0]
    client = MlflowClient(tracking_uri=project.tracking_uri, registry_uri=project.tracking_uri)
    version = client.get_model_version_by_alias(record["name"], "champion")
    assert int(version.version) == record["version"]


def test_version_carries_lineage_tags_and_the_gate_report(project: Project) -> None:
    from mlflow import MlflowClient

    record = json.loads(project.path("registration").read_text(encoding="utf-8"))["models"][0]
    client = MlflowClient(tracking_uri=project.tracking_uri, registry_uri=project.tracking_uri)
    tags = client.get_model_version(record["name"], str(record["version"])).tags
    lock = yaml.safe_load((project.root / "dvc.lock").read_text(encoding="utf-8"))  # the folder is no dep (dvc.yaml)
    [manifest] = [d for d in lock["stages"]["ingest"]["outs"] if d["path"] == project.params["paths"]["manifest"]]
    assert tags["data_hash"] == manifest["md5"] and tags["data_source"] == "data/synthetic"
    assert tags["git_commit"] == tags["dvc_commit"] and len(tags["git_commit"]) == 40
    calibrate = client.get_run(tags["calibration_run_id"])
    assert calibrate.data.tags["stage"] == "calibrate"
    assert tags["gate.passed"] == "true" and tags["gate.export_parity"].startswith("pass")
    assert record["alias_moved"] is True and record["gate"]["passed"] is True
    assert {c["name"] for c in record["gate"]["checks"]} == {"image_auroc", "false_reject_rate",
                                                              "infer_latency_ms", "export_parity"}


def test_stage_runs_log_their_dataset_as_mlflow_inputs(project: Project) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.get_experiment_by_name("bdi")
    runs = {r.data.tags.get("stage"): r for r in client.search_runs([experiment.experiment_id])}
    inputs = {stage: [(d.dataset.name, d.dataset.digest, d.dataset.source_type, {t.key: t.value for t in d.tags})
                      for d in runs[stage].inputs.dataset_inputs] for stage in STAGES}
    [(name, digest, source_type, tags)] = inputs["fit_ok"]
    assert name == "synthetic-train" and len(digest) == 32 and source_type == "local"
    assert tags["mlflow.data.context"] == "train"
    assert inputs["evaluate"][0][0] == "synthetic-eval" and inputs["ingest"][0][0] == "synthetic"


def test_sync_and_server_answer_with_registered_threshold(project: Project, tmp_path: Path) -> None:
    from bdi.refs import ModelRef
    from bdi.storage.store import ModelStore

    models = tmp_path / "models"
    project.run(str(VENV_BIN / "bdi"), "sync", "--models-dir", str(models), "--project-root", str(project.root))
    ref = ModelRef.create(recipe_id="synthetic", role_id="disc", roi_id="ring", model_key=None)
    store = ModelStore(models)
    assert store.load_memory(ref) is not None
    calib = store.calibrations.document(ref)
    registered = json.loads(project.path("registration").read_text(encoding="utf-8"))["models"][0]
    assert calib is not None and calib["threshold"] == pytest.approx(registered["threshold"])

    image = next((project.root / project.params["dataset"]["source"] / "test" / "pit").glob("*.png"))
    with UvicornServer(cwd=tmp_path, env=server_env(tmp_path, models)) as server:  # cwd outside the repository
        response = httpx.post(
            f"{server.base_url}/infer",
            data={"role_id": "disc", "roi_id": "ring", "mm_per_px": str(MM_PER_PX), "recipe_id": "synthetic"},
            files={"image": (image.name, image.read_bytes(), "image/png")},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    assert response.json()["threshold"] == pytest.approx(registered["threshold"])
    lineage = response.json()["lineage"]  # from the reject back to the data and the code
    assert (lineage["registered_model"], lineage["registered_version"]) == (registered["name"], registered["version"])
    assert lineage["mlflow_run_id"] == registered["run_id"] and len(lineage["git_commit"]) == 40
    assert lineage["data_hash"] and lineage["threshold_source"] == "calibration_run"


def test_a_refused_first_version_says_there_is_no_champion_yet_why_and_what_to_change(
        project: Project, tmp_path: Path) -> None:
    """The register stage by hand on the project's models, into a registry of its own (so v1, no champion) with a
    latency budget no model meets: its last line is the verdict; the version is registered, the alias is not set."""
    from mlflow import MlflowClient

    registry = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registration = tmp_path / "registration.json"
    out = project.run(sys.executable, "-m", "pipelines.register", f"tracking.tracking_uri={registry}",
                      f"paths.registration={registration}", "promotion.max_infer_latency_ms=0.001")
    last = out.stdout.strip().splitlines()[-1]
    record = json.loads(registration.read_text(encoding="utf-8"))["models"][0]
    assert record["version"] == 1 and record["alias_moved"] is False
    assert last == f"register: synthetic/disc/ring: {record['verdict']}"
    assert last.startswith(f"register: synthetic/disc/ring: REFUSED: no champion yet: {record['name']} v1 "
                           "refused because infer_latency_ms: "), last
    assert "limit 0.001" in last and "Change a lighter model" in last and "promotion.max_infer_latency_ms" in last
    assert "vNone" not in last and "stays on" not in last
    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    assert client.get_registered_model(record["name"]).aliases == {}


def test_second_repro_reruns_only_ingest(project: Project) -> None:
    """ingest is always_changed (dvc.yaml); the same files give the same manifest, so nothing after it runs."""
    out = project.dvc("repro").stdout
    assert _ran(out) == {"ingest"}, out
    assert all(f"Stage '{stage}' didn't change" in out for stage in STAGES[1:]), out
    status = project.dvc("status").stdout
    assert "always changed" in status and "fit_ok" not in status, status


def test_exp_run_with_a_hydra_override_reruns_fit_and_downstream_only(project: Project) -> None:
    assert project.params["model"]["memory"]["coreset_rate"] == 0.1
    out = project.dvc("exp", "run", "-S", "model.memory.coreset_rate=0.05").stdout
    assert project.params["model"]["memory"]["coreset_rate"] == 0.05  # composed by DVC from conf/ + the override
    assert project.params["dataset"]["name"] == "synthetic"
    assert project.params["model"]["features"]["weights"] == "random"
    assert _ran(out) == {"ingest", "fit_ok", "calibrate", "evaluate", "register"}, out  # ingest: always_changed
    registration = json.loads(project.path("registration").read_text(encoding="utf-8"))
    assert registration["models"][0]["version"] == 2


@dataclass(frozen=True)
class CalibrationPair:
    """Two calibration experiments run once (``dvc exp run -n``): what each printed and its parent run by name."""

    accepted: str  # stdout of `dvc exp run -n calib-ng10`
    refused: str  # stdout of the experiment that the gate refuses
    experiment_id: str
    parents: dict[str, Any]  # run name -> mlflow Run


@pytest.fixture(scope="module")
def calibration_pair(project: Project) -> CalibrationPair:
    """``calibration.ng_percentile`` 10 vs 50 (the second also with a latency budget no model meets, so its
    promotion is refused), compared by ``MlflowClient`` and in the MLflow UI from the same two runs."""
    from mlflow import MlflowClient

    accepted = project.dvc("exp", "run", "-n", CALIBRATIONS[0], "-S", "calibration.ng_percentile=10").stdout
    refused = project.dvc("exp", "run", "-n", CALIBRATIONS[1], "-S", "calibration.ng_percentile=50",
                          "-S", "promotion.max_infer_latency_ms=0.001").stdout
    client = MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.get_experiment_by_name("bdi")
    parents = {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id], filter_string="tags.pipeline = 'true' and attributes.run_name LIKE 'calib-%'")}
    return CalibrationPair(accepted=accepted, refused=refused, experiment_id=experiment.experiment_id,
                           parents=parents)


def test_two_calibration_experiments_compare_as_two_parent_runs(
        project: Project, calibration_pair: CalibrationPair) -> None:
    from mlflow import MlflowClient

    accepted, refused = calibration_pair.accepted, calibration_pair.refused
    assert _ran(accepted) - {"ingest"} == {"calibrate", "evaluate", "register"}, accepted  # ingest: always_changed
    assert "register: synthetic/disc/ring: promoted: champion -> " in accepted
    assert "register: synthetic/disc/ring: REFUSED: " in refused and "champion stays on v" in refused
    assert "the model itself is too slow" in refused and "promotion.max_infer_latency_ms" in refused
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)  # the workspace holds the last experiment
    registration = shown[""]["data"]["registration.json"]["data"]
    assert registration["promoted"] == 0 and registration["refused"] == 1

    client = MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.get_experiment_by_name("bdi")
    parents = calibration_pair.parents
    assert set(parents) == set(CALIBRATIONS)
    a, b = parents["calib-ng10"], parents["calib-ng50-slowgate"]
    for parent in (a, b):
        assert parent.info.status == "FINISHED"
        assert set(parent.data.metrics) == {*COMPARED, "promotion/promoted", "promotion/refused", "registered_version"}
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        stages = sorted(c.data.tags["stage"] for c in children)
        assert [s for s in stages if s != "ingest"] == ["calibrate", "evaluate", "register"]  # ingest: always_changed
        assert parent.data.params["model.scoring.score_percentile"] not in ("None", "")
        name = parent.info.run_name
        assert parent.data.tags["dvc_exp_name"] == name and parent.data.tags["dataset_digest"]
        assert parent.data.tags["dvc_exp_ref"].startswith("refs/exps/") and parent.data.tags["dvc_exp_ref"].endswith(
            f"/{name}")
    assert (a.data.params["calibration.ng_percentile"], b.data.params["calibration.ng_percentile"]) == ("10.0", "50.0")
    assert a.data.params["threshold.ng_percentile"] == "10.0" and b.data.params["threshold.ng_percentile"] == "50.0"
    assert a.data.metrics["promotion/promoted"] == 1.0 and b.data.metrics["promotion/promoted"] == 0.0
    assert b.data.tags["promotion.passed"] == "false" and b.data.tags["promotion.verdict"].startswith("REFUSED")
    version = client.get_model_version(b.data.tags["registered_model"], b.data.tags["registered_version"])
    assert version.tags["dvc_exp_name"] == "calib-ng50-slowgate"
    from pipelines.register import logged_model_id

    # MLflow 3: the version's figures, linked to its LoggedModel and to the data
    logged = client.get_logged_model(logged_model_id(version))
    linked = {m.key: m for m in logged.metrics or []}
    assert linked["eval/image_auroc"].dataset_name == "synthetic-eval" and linked["eval/image_auroc"].dataset_digest
    exp_commit = project.run("git", "rev-parse", version.tags["dvc_exp_ref"]).stdout.strip()
    assert len(exp_commit) == 40 and exp_commit != version.tags["git_commit"]  # the experiment's, not its base


@pytest.fixture(scope="session")
def chromium() -> str:
    """Session-scoped so a missing browser skips before the module's DVC project is built."""
    return chromium_or_skip()


def compare_url(base_url: str, *, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The MLflow UI's compare page (its route ``/compare-runs?runs=[…]&experiments=[…]``, JSON lists)."""
    return f"{base_url}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps(experiment_ids)}"


COMPARED = COMPARISON_METRICS  # the parent run's comparison row: all of it in the compare page's metrics box
UI_TIMEOUT_MS = 120_000


def show_compare_page(page: Any, *, base_url: str, run_ids: list[str], experiment_id: str,
                      timeout_ms: float = UI_TIMEOUT_MS) -> str:
    """Open the compare page of ``run_ids``, wait until its tables show both runs, the comparison metrics and the
    changed param, and lay it out as README's screenshot (no assistant panel, sidebar or plots; params: differences
    only; MLflow's metrics table is a box of its own that shows its first rows); returns the page's text."""
    page.goto(compare_url(base_url, run_ids=run_ids, experiment_ids=[experiment_id]))
    for name in CALIBRATIONS:  # the run details table has loaded both runs
        page.get_by_text(name, exact=True).first.wait_for(timeout=timeout_ms)
    for label in COMPARED:
        page.get_by_text(label, exact=True).first.wait_for(timeout=timeout_ms)
    page.get_by_role("button", name="Close").click()  # the assistant panel
    page.get_by_role("button", name="Toggle sidebar").click()
    page.get_by_text("Visualizations", exact=True).click()  # collapsed
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    # the params table's row; the collapsed Visualizations section keeps a hidden selector of the same text
    page.get_by_text("calibration.ng_percentile", exact=True).filter(visible=True).first.wait_for(timeout=timeout_ms)
    return str(page.inner_text("body"))


def test_mlflow_ui_compare_page_shows_both_calibrations_side_by_side(
        chromium: str, project: Project, calibration_pair: CalibrationPair, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    parents = [calibration_pair.parents[name] for name in CALIBRATIONS]
    server = MlflowServer(backend_uri=project.tracking_uri, artifacts=tmp_path / "artifacts", scratch=tmp_path)
    with server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 760, "height": 1240})
            text = show_compare_page(page, base_url=server.uri, run_ids=[p.info.run_id for p in parents],
                                     experiment_id=calibration_pair.experiment_id)
            shots = save_screenshot(page, dest_dir=tmp_path, name="mlflow_compare.png")
            viewport_height = page.viewport_size["height"]
            # the metrics table's row names are links to each metric's page: the viewport boxes of every rendered
            # one of each name, read in one snapshot (the virtualized table re-renders; a locator may go stale)
            shown = page.evaluate(
                """labels => Object.fromEntries(labels.map(label => [label, [...document.querySelectorAll("a")]
                    .filter(a => a.textContent.trim() === label && a.getClientRects().length > 0)
                    .map(a => { const r = a.getBoundingClientRect(); return {y: r.top, height: r.height}; })]))""",
                list(COMPARED))
        finally:
            browser.close()
    assert "calibration.ng_percentile\t10.0\t50.0" in text, text[:4000]  # the changed param, side by side
    for parent in parents:  # the thresholds themselves, as the UI rounds them
        assert f"{parent.data.metrics['calib/threshold']:.3g}" in text.split("calib/threshold", 1)[1], text[:4000]
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    off_screen = [label for label, boxes in shown.items()
                  if not any(0 <= box["y"] and box["y"] + box["height"] <= viewport_height for box in boxes)]
    assert not off_screen, f"not in the screenshot: {off_screen}"  # the whole comparison row, on one screen
