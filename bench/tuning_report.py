"""The pipeline's tuning experiments (``dvc repro`` + ``dvc exp run -S …``) as one markdown table, from MLflow.

``python -m bench.tuning_report --tracking-uri sqlite:///<project>/mlflow.db`` reads the stage runs with
``MlflowClient.search_runs`` and groups them into pipeline executions by their ``config_hash`` tag (every stage
of one execution logs the same resolved config; a configuration run twice counts once, its latest runs). A row
shows what the execution changed against the baseline (the earliest execution, i.e. the first ``dvc repro``;
``--baseline-run`` names another calibrate run), the selection metrics of the calibrate stage
(``calib/image_auroc``, ``calib/pixel_auroc``: the calib split), the evaluate stage's image and pixel AUROC
(``eval/…``, the eval split: reported, never used to choose) and the fit time (features + coreset,
``fit/timings_ms.…``) of the fit_ok stage. Runs logged before the stage figures were prefixed read too.

The winner, in bold, has the best calib image AUROC, ties broken by calib pixel AUROC.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bench.quality_report import fmt

STAGES = ("fit_ok", "calibrate", "evaluate")
IGNORED_PARAM_PREFIXES = ("paths.", "tracking.")


@dataclass(frozen=True)
class Execution:
    """One pipeline execution: its resolved params and the metrics of its stage runs."""

    config_hash: str
    started_ms: int
    calibrate_run_id: str
    params: Mapping[str, str]
    calib_image_auroc: float | None
    calib_pixel_auroc: float | None
    eval_image_auroc: float | None
    eval_pixel_auroc: float | None
    fit_s: float | None
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def selection_key(self) -> tuple[float, float]:
        return (_or_low(self.calib_image_auroc), _or_low(self.calib_pixel_auroc))


def _or_low(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -math.inf


def metric(metrics: Mapping[str, float], name: str, *, prefix: str = "", legacy: str | None = None) -> float | None:
    """``prefix + name`` as the stage logs it for one model (``calib/image_auroc``), else the mean over its models
    (``calib/<recipe>/<role>/<roi>/image_auroc``), else ``legacy``, the name runs logged before the stage figures
    were prefixed (``calib_image_auroc``, ``image_auroc``)."""
    if prefix + name in metrics:
        return float(metrics[prefix + name])
    values = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(f"/{name}")]
    if values:
        return statistics.fmean(values)
    if legacy is not None and legacy != prefix + name:
        return metric(metrics, legacy)
    return None


def _fit_s(metrics: Mapping[str, float]) -> float | None:
    encode, coreset = (metric(metrics, f"timings_ms.{stage}", prefix="fit/", legacy=f"timings_ms.{stage}")
                       for stage in ("encode", "coreset"))
    return None if encode is None or coreset is None else (encode + coreset) / 1000.0


def read_executions(client: Any, *, experiment: str) -> list[Execution]:
    """Every execution that has a finished calibrate run, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} at {client.tracking_uri}")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    latest: dict[str, dict[str, Any]] = {}
    for run in runs:  # oldest first: a later run of the same config and stage replaces an earlier one
        tags = run.data.tags
        if tags.get("stage") in STAGES and tags.get("config_hash"):
            latest.setdefault(tags["config_hash"], {})[tags["stage"]] = run
    executions = []
    for config_hash, stages in latest.items():
        calib = stages.get("calibrate")
        if calib is None:
            continue
        evaluated = stages["evaluate"].data.metrics if "evaluate" in stages else {}
        fitted = stages["fit_ok"].data.metrics if "fit_ok" in stages else {}
        executions.append(Execution(
            config_hash=config_hash, started_ms=calib.info.start_time, calibrate_run_id=calib.info.run_id,
            params=dict(calib.data.params),
            calib_image_auroc=metric(calib.data.metrics, "image_auroc", prefix="calib/", legacy="calib_image_auroc"),
            calib_pixel_auroc=metric(calib.data.metrics, "pixel_auroc", prefix="calib/", legacy="calib_pixel_auroc"),
            eval_image_auroc=metric(evaluated, "image_auroc", prefix="eval/", legacy="image_auroc"),
            eval_pixel_auroc=metric(evaluated, "pixel_auroc", prefix="eval/", legacy="pixel_auroc"),
            fit_s=_fit_s(fitted),
        ))
    return sorted(executions, key=lambda e: e.started_ms)


def with_overrides(executions: Sequence[Execution], *, baseline: Execution) -> list[Execution]:
    """Each execution with the params (``paths.*``/``tracking.*`` aside) that differ from ``baseline``'s."""
    out = []
    for ex in executions:
        keys = sorted(set(ex.params) | set(baseline.params))
        diff = {k: ex.params.get(k, "–") for k in keys
                if not k.startswith(IGNORED_PARAM_PREFIXES) and ex.params.get(k) != baseline.params.get(k)}
        out.append(replace(ex, overrides=diff))
    return out


def winner(executions: Sequence[Execution]) -> Execution:
    """The best calib image AUROC, ties broken by calib pixel AUROC (the eval split plays no part)."""
    return max(executions, key=lambda e: e.selection_key)


def render_markdown(executions: Sequence[Execution], *, baseline: Execution) -> str:
    best = winner(executions)
    header = ["run", "overrides vs baseline", "calib image AUROC", "calib pixel AUROC", "eval image AUROC",
              "eval pixel AUROC", "fit s (features + coreset)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for ex in executions:
        label = "baseline" if ex.config_hash == baseline.config_hash else ex.calibrate_run_id[:8]
        overrides = ", ".join(f"`{k}={v}`" for k, v in ex.overrides.items()) or "(defaults)"
        calib = [fmt(ex.calib_image_auroc), fmt(ex.calib_pixel_auroc)]
        if ex is best:
            label, calib = f"**{label}** (winner)", [f"**{c}**" for c in calib]
        cells = [label, overrides, *calib, fmt(ex.eval_image_auroc), fmt(ex.eval_pixel_auroc), fmt(ex.fit_s, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="bdi", help="the MLflow experiment (tracking.experiment)")
    parser.add_argument("--baseline-run", help="the calibrate run id of the baseline (default: the earliest)")
    args = parser.parse_args(argv)
    from mlflow import MlflowClient

    executions = read_executions(MlflowClient(tracking_uri=args.tracking_uri), experiment=args.experiment)
    if not executions:
        raise SystemExit("no pipeline execution with a finished calibrate run")
    baseline = executions[0]
    if args.baseline_run:
        matches = [e for e in executions if e.calibrate_run_id == args.baseline_run]
        if not matches:
            raise SystemExit(f"--baseline-run {args.baseline_run}: no calibrate run with that id")
        baseline = matches[0]
    sys.stdout.write(render_markdown(with_overrides(executions, baseline=baseline), baseline=baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
