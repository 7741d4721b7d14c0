"""The MLflow runs of a pipeline execution: which execution a stage belongs to (``execution``: the DVC experiment or
process, found under ``/proc``), the tags and dataset inputs of its runs, and ``stage_run``, the stage's run nested
under the execution's parent run (``bdi.mlops.tracking.execution_run``), whose ``PARENT_KEPT_TAGS`` carry the
comparison row. The stage plumbing (config, CLI, progress, outputs) is ``pipelines.stage``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bdi.digest import file_sha256
from pipelines.config import PARAMS_FILE, flatten
from pipelines.manifest import read_manifest

if TYPE_CHECKING:
    from pipelines.stage import StageContext


def git_commit(root: Path) -> str | None:
    """``git rev-parse HEAD`` of the project, or None outside git / before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _params_sha256(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def resolved_config(ctx: StageContext) -> dict[str, Any]:
    """The config as it is applied: ``model`` with every backbone default filled in (``model_config``), so a
    param never reads ``None`` where a default was used (``model.scoring.score_percentile``: 100 for the CNNs)."""
    from dataclasses import asdict

    from pipelines.config import model_config

    return {**ctx.config_dict, "model": asdict(model_config(ctx.cfg))}


def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """``(command name, parent pid, start time)`` of a Linux process from ``/proc/<pid>/stat``; None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    comm = text[text.index("(") + 1: text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), fields[19]  # state ppid … starttime (field 22 of stat)


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh"})


def _dvc_process() -> str | None:
    """``<pid>-<start time>`` of the DVC process running this stage: the first ancestor that is not a shell
    (DVC runs a stage's ``cmd`` through ``$SHELL -c``). Every stage of one ``dvc repro`` / ``dvc exp run`` has
    the same; None where ``/proc`` is missing."""
    pid = os.getppid()
    for _ in range(8):
        stat = _proc_stat(pid)
        if stat is None:
            return None
        comm, ppid, started = stat
        if comm not in _SHELLS:
            return f"{pid}-{started}"
        pid = ppid
    return None


@dataclass(frozen=True)
class Execution:
    """One execution of the pipeline, whose stages (separate processes, some skipped as cached) share one
    MLflow parent run: found by ``key``, named ``name`` (the DVC experiment's)."""

    key: str
    name: str
    exp_name: str | None
    baseline_rev: str | None

    @property
    def exp_ref(self) -> str | None:
        """The git ref DVC saves the experiment under (``refs/exps/<base[:2]>/<base[2:]>/<name>``): its commit
        once ``dvc exp run`` has finished (``git rev-parse <ref>``)."""
        if not (self.exp_name and self.baseline_rev and len(self.baseline_rev) > 2):
            return None
        return f"refs/exps/{self.baseline_rev[:2]}/{self.baseline_rev[2:]}/{self.exp_name}"


EXECUTION_ENV = "BDI_PIPELINE_EXECUTION"  # set it to group hand-run stages under one parent run


def execution(ctx: StageContext) -> Execution:
    """Which execution this stage belongs to. Under ``dvc exp run`` DVC sets ``DVC_EXP_NAME`` (``-n NAME`` or its
    generated name) and ``DVC_EXP_BASELINE_REV`` in every stage's environment (dvc/repo/experiments/queue/base.py);
    ``dvc repro`` sets only ``DVC_STAGE``/``DVC_ROOT``. The key adds the DVC process (pid + start time), so two
    executions never share a parent; by hand, ``BDI_PIPELINE_EXECUTION`` or this process."""
    exp_name = os.environ.get("DVC_EXP_NAME") or None
    baseline = os.environ.get("DVC_EXP_BASELINE_REV") or None
    commit = git_commit(ctx.project_root)
    short = commit[:7] if commit else "nogit"
    explicit = os.environ.get(EXECUTION_ENV)
    if explicit:
        key, name = f"env:{explicit}", explicit
    elif os.environ.get("DVC_STAGE"):
        process = _dvc_process() or f"{commit}:{_params_sha256(ctx.project_root / PARAMS_FILE)}"
        key = f"dvc:{exp_name or 'workspace'}:{process}"
        name = exp_name or f"workspace@{short}"
    else:
        stat = _proc_stat(os.getpid())
        key, name = f"process:{os.getpid()}-{stat[2] if stat else ''}", f"manual@{short}"
    return Execution(key=key.replace("'", "_"), name=name, exp_name=exp_name, baseline_rev=baseline)


def run_tags(ctx: StageContext) -> dict[str, str]:
    """Tags of every stage run: stage, DVC stage, git commit, params hash, config source, and the lineage of
    the execution (``dvc_exp_name``, ``dvc_exp_baseline_rev``, ``dvc_exp_ref``)."""
    run = execution(ctx)
    tags = {
        "stage": ctx.stage,
        "source": "pipeline",
        "config_source": ctx.config_source,
        "dataset": ctx.cfg.dataset.name,
        "recipe_id": ctx.cfg.dataset.recipe,
        "dvc_stage": os.environ.get("DVC_STAGE"),
        "dvc_commit": git_commit(ctx.project_root),
        "dvc_exp_name": run.exp_name,
        "dvc_exp_baseline_rev": run.baseline_rev,
        "dvc_exp_ref": run.exp_ref,
        "dvc_params_hash": _params_sha256(ctx.project_root / PARAMS_FILE),
        "config_hash": hashlib.sha256(json.dumps(ctx.config_dict, sort_keys=True).encode()).hexdigest(),
        "overrides": " ".join(ctx.overrides) or None,
    }
    return {k: v for k, v in tags.items() if v}


# The manifest split each stage reads, logged as the run's dataset input (None: every row).
STAGE_SPLITS: dict[str, str | None] = {"fit_ok": "train", "calibrate": "calib", "evaluate": "eval",
                                       "register": None}
DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters


@dataclass(frozen=True)
class DatasetIdentity:
    """What a run read: the dataset's name, its source folder and a digest of the images' sha256s."""

    name: str
    source: str
    digest: str
    n_images: int


def dataset_identity(ctx: StageContext, *, split: str | None) -> DatasetIdentity | None:
    """The identity of the manifest rows of ``split`` (all rows for None); None without a manifest."""
    path = ctx.path(ctx.cfg.paths.manifest)
    if not path.is_file():
        return None
    from pipelines.sources import ingested_folder

    rows = [r for r in read_manifest(path) if split is None or r.split == split]
    digest = hashlib.sha256("\n".join(r.sha256 for r in rows).encode("ascii")).hexdigest()[:DIGEST_CHARS]
    name = ctx.cfg.dataset.name if split is None else f"{ctx.cfg.dataset.name}-{split}"
    folder = ingested_folder(ctx.cfg, root=ctx.project_root)  # for dataset=auto: the server's or generated one
    return DatasetIdentity(name=name, source=str(folder.resolve()), digest=digest, n_images=len(rows))


def log_dataset(run: Any, ctx: StageContext, *, split: str | None, context: str) -> DatasetIdentity | None:
    """``mlflow.log_input`` of the rows a stage read (name, source, digest), so the MLflow UI shows them."""
    identity = dataset_identity(ctx, split=split)
    if identity is not None:
        run.log_input(name=identity.name, source=identity.source, digest=identity.digest, context=context)
    return identity


def dvc_data_hash(root: Path, *, source: str) -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for the data the ingest stage read: its dependency on ``source`` when
    dvc.yaml declares one, else the manifest it wrote (``paths.manifest``, the sha256 of every file read; the
    dataset folder is no DVC dependency, see dvc.yaml); None when the pipeline has not been run by DVC."""
    lock = Path(root) / "dvc.lock"
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    ingest = (data.get("stages") or {}).get("ingest") or {}
    manifest = (((ingest.get("params") or {}).get(PARAMS_FILE) or {}).get("paths") or {}).get("manifest")
    for wanted, entries in ((source, ingest.get("deps")), (manifest, ingest.get("outs"))):
        for entry in entries or []:
            if wanted and isinstance(entry, dict) and \
                    os.path.normpath(str(entry.get("path", ""))) == os.path.normpath(wanted):
                value = entry.get("md5") or entry.get("hash")
                return str(value) if value else None
    return None


# The figures of the parent run's comparison row, the rest staying on the stage's child run. MLflow's compare page
# shows a run's metrics sorted by name in a box six rows high: these six fit it, the promotion figures follow.
COMPARISON_METRICS = ("calib/threshold", "calib/false_reject_rate", "calib/escape_rate",
                      "eval/image_auroc", "eval/false_reject_rate", "eval/escape_rate")

PARENT_KEPT_TAGS = ("dataset", "recipe_id", "config_source", "dvc_commit", "dvc_exp_name", "dvc_exp_baseline_rev",
                    "dvc_exp_ref", "dvc_params_hash", "config_hash", "overrides")


@dataclass
class StageRun:
    """A stage's MLflow run (``run``, a child) and the execution's parent run (``parent``), which carries the
    comparison row: resolved params, the ``COMPARISON_METRICS``, the ``promotion/…`` figures and the version."""

    run: Any
    parent: Any

    @property
    def run_id(self) -> str:
        return str(self.run.run_id)

    def log_comparison(self, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` on the child run and the ``COMPARISON_METRICS`` among them on the parent run."""
        self.run.log_metrics(metrics)
        self.parent.log_metrics({k: v for k, v in metrics.items() if k in COMPARISON_METRICS})

    def __getattr__(self, name: str) -> Any:  # log_metrics, log_dict … go to the child run
        return getattr(self.run, name)


@contextmanager
def stage_run(ctx: StageContext) -> Iterator[StageRun]:
    """The stage's MLflow run, named after the stage and nested under the execution's parent run (named after the
    DVC experiment, ``execution``), both with the resolved config (``resolved_config``) as params; the manifest rows
    the stage reads are logged as its dataset input (``STAGE_SPLITS``)."""
    from bdi.mlops.tracking import execution_run, tracked_run

    tracking = ctx.tracking()
    run_info = execution(ctx)
    params = flatten(resolved_config(ctx))
    tags = run_tags(ctx)
    parent_tags = {k: v for k, v in tags.items() if k in PARENT_KEPT_TAGS}
    parent_tags["pipeline"] = "true"
    dataset = dataset_identity(ctx, split=None)
    if dataset is not None:
        parent_tags["dataset_digest"] = dataset.digest
    with execution_run(tracking, key=run_info.key, run_name=run_info.name, tags=parent_tags, params=params) as parent:
        with tracked_run(tracking, run_name=ctx.stage, tags=tags, params=params,
                         parent_run_id=parent.run_id or None) as run:
            run.log_dict(ctx.config_dict, "config.yaml")
            if ctx.stage in STAGE_SPLITS:
                split = STAGE_SPLITS[ctx.stage]
                log_dataset(run, ctx, split=split, context=split or ctx.stage)
            yield StageRun(run=run, parent=parent)
