"""Stage 4, evaluate: score the ``eval`` split with the calibrated models and write metrics and plots.

Per model (``<recipe>/<role>/<roi>``), from ``bdi.data.metrics``: image AUROC, pixel AUROC and AUPRO
(where masks exist), F1 / precision / recall, false-reject rate (OK) and escape rate (NG) at the
calibrated threshold, at the calibration's OK / review / NG band (when it has one) the share of parts sent to
review and the escape and false-reject rates of the parts it decides (``review_rate``, ``band_escape_rate``,
``band_false_reject_rate``), and per defect class AUROC (class vs good) and recall. Outputs (all paths from
``paths.*``): ``metrics`` (JSON; top level = mean over models), ``scores`` (CSV per image), ``roc`` and
``score_hist`` (CSV plot data for DVC) and ``images_dir`` (ROC, histogram with the threshold, and a
heatmap gallery of the worst cases: NG with the lowest scores, OK with the highest, as PNGs). In MLflow the
figures are ``eval/<name>`` (means over models; ``eval/<model>/<name>`` each), on the stage's run and, the means,
on the execution's parent run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from pipelines.manifest import PipelineDataError, read_manifest
from pipelines.stage import (
    StageContext,
    build_service,
    evaluate_rows,
    execute_stage,
    rows_for,
    run_cli,
    score_rows,
    stage_run_with_progress,
    targets,
    write_json,
)

log = logging.getLogger("pipelines.evaluate")
STAGE = "evaluate"
EVAL_PREFIX = "eval/"  # MLflow names of this stage's figures (the eval split); calibrate's are ``calib/``
SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1", "precision", "recall", "false_reject_rate",
                "escape_rate", "review_rate", "band_escape_rate", "band_false_reject_rate")


def band_metrics(calib: Any, *, ok_scores: list[float], ng_scores: list[float]) -> dict[str, float | None]:
    """Where the calibration's OK / review / NG band sends the split: ``review_rate`` (share of parts sent to
    review; 0.0 without a band: the single threshold decides every part), and with a band its thresholds and the
    escape and false-reject rates of the parts it decides (``band_escape_rate``: NG below ``threshold_low``,
    ``band_false_reject_rate``: OK at or above ``threshold_high``)."""
    from bdi.patchcore.calibration import band_rates

    band = calib.band
    if band is None:
        return {"review_rate": 0.0}
    rates = band_rates(np.asarray(ok_scores), np.asarray(ng_scores), low=band.threshold_low, high=band.threshold_high)
    return {"review_rate": rates.review_rate, "band_escape_rate": rates.escape_rate,
            "band_false_reject_rate": rates.false_reject_rate, "threshold_low": band.threshold_low,
            "threshold_high": band.threshold_high}


@dataclass
class ModelEvaluation:
    key: str
    slug: str
    metrics: dict[str, Any]
    scores: list[dict[str, Any]]
    roc: list[dict[str, Any]]
    histogram: list[dict[str, Any]]
    images: dict[str, Path] = field(default_factory=dict)


@dataclass
class EvaluationOutputs:
    metrics: dict[str, Any]
    models: list[ModelEvaluation]


def _worst(scores: list[float], labels: list[int], threshold: float, n: int) -> list[int]:
    """Indices of the ``n`` worst cases by signed margin: NG far below / OK far above the threshold."""
    margins = [(s - threshold) if y == 1 else (threshold - s) for s, y in zip(scores, labels, strict=True)]
    return sorted(range(len(scores)), key=lambda i: margins[i])[: max(0, n)]


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def run_evaluate(
    ctx: StageContext, *, progress: Any | None = None
) -> EvaluationOutputs:
    """Score every model's eval split; compute metrics; write the plot PNGs into ``paths.images_dir``."""
    from bdi.data.metrics import score_histogram
    from bdi.data.plots import plot_gallery, plot_roc, plot_score_histogram
    from bdi.errors import NotFittedError
    from bdi.patchcore.calibration import decide

    cfg = ctx.cfg
    manifest = read_manifest(ctx.path(cfg.paths.manifest))
    model_dir = ctx.path(cfg.paths.model_dir)
    if not model_dir.is_dir():
        raise PipelineDataError(f"{model_dir} (paths.model_dir) is missing: run the calibrate stage first")
    images_dir = ctx.path(cfg.paths.images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("*.png"):  # plots of a previous run (perhaps of other models)
        stale.unlink()
    service = build_service(ctx, models_dir=model_dir)
    models: list[ModelEvaluation] = []
    for target in targets(cfg):
        try:
            model = service.model(target.ref, endpoint="evaluate")
        except NotFittedError as exc:
            raise PipelineDataError(f"no fitted model for {target.key} in {model_dir}") from exc
        assert model.calibration is not None  # calibrated: CalibrationMissingError otherwise
        threshold = model.calibration.threshold
        rows = rows_for(manifest, target, "eval")
        images, results = score_rows(service, target=target, rows=rows, root=ctx.project_root,
                                     scoring=model.scoring, progress=progress)
        report = evaluate_rows(ctx, rows=rows, results=results, threshold=threshold)
        labels = [1 if row.label == "ng" else 0 for row in rows]
        scores = [float(r.score) for r in results]
        classes = [row.defect_class for row in rows]
        maps = [r.anomaly_map for r in results]
        ok_scores = [s for s, y in zip(scores, labels, strict=True) if y == 0]
        ng_scores = [s for s, y in zip(scores, labels, strict=True) if y == 1]
        verdicts = [model.calibration.judge(s, review_decision=service.settings.calibration.review_decision)
                    for s in scores]
        evaluation = ModelEvaluation(
            key=target.key, slug=target.slug,
            metrics={**report.to_dict(), **band_metrics(model.calibration, ok_scores=ok_scores, ng_scores=ng_scores)},
            scores=[{"model": target.key, "file": row.file, "label": row.label,
                     "defect_class": row.defect_class, "score": s, "decision": v.decision, "review": v.review}
                    for row, s, v in zip(rows, scores, verdicts, strict=True)],
            roc=[{"model": target.key, **p} for p in report.roc],
            histogram=[{"model": target.key, **h}
                       for h in score_histogram(ok_scores, ng_scores, n_bins=cfg.evaluation.histogram_bins)],
        )
        worst = _worst(scores, labels, threshold, cfg.evaluation.gallery_size)
        evaluation.images = {
            "roc": plot_roc(report.roc, images_dir / f"{target.slug}_roc.png", title=f"ROC {target.key}"),
            "histogram": plot_score_histogram(ok_scores, ng_scores, threshold,
                                              images_dir / f"{target.slug}_scores.png",
                                              title=f"Scores {target.key}"),
            "gallery": plot_gallery(
                [images[i] for i in worst], [maps[i] for i in worst],
                [f"{classes[i]} {Path(rows[i].file).name}\nscore {scores[i]:.4g} "
                 f"({decide(scores[i], threshold).upper()})" for i in worst],
                images_dir / f"{target.slug}_worst.png",
            ),
        }
        models.append(evaluation)
        log.info("evaluate %s: image AUROC %s, F1 %s at threshold %.6g on %d images", target.key,
                 report.overall["image_auroc"], report.overall["f1"], threshold, len(rows))
    metrics: dict[str, Any] = {k: _mean([m.metrics.get(k) for m in models]) for k in SUMMARY_KEYS}
    metrics["n_models"] = len(models)
    metrics["models"] = {m.key: m.metrics for m in models}
    return EvaluationOutputs(metrics=metrics, models=models)


def write_outputs(outputs: EvaluationOutputs, *, ctx: StageContext) -> dict[str, Path]:
    """metrics JSON, per-image scores CSV, ROC and histogram CSVs (DVC plots)."""
    import pandas as pd

    paths = ctx.cfg.paths
    out = {"metrics": write_json(ctx.path(paths.metrics), outputs.metrics)}
    tables = {
        "scores": (paths.scores, [r for m in outputs.models for r in m.scores],
                   ["model", "file", "label", "defect_class", "score", "decision", "review"]),
        "roc": (paths.roc, [r for m in outputs.models for r in m.roc], ["model", "fpr", "tpr", "threshold"]),
        "score_hist": (paths.score_hist, [r for m in outputs.models for r in m.histogram],
                       ["model", "bin_lo", "bin_hi", "bin_center", "ok", "ng"]),
    }
    for name, (rel, rows, columns) in tables.items():
        path = ctx.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
        out[name] = path
    return out


def execute(ctx: StageContext) -> EvaluationOutputs:
    with stage_run_with_progress(ctx, run_evaluate) as (run, outputs):
        files = write_outputs(outputs, ctx=ctx)
        summary = {f"{EVAL_PREFIX}{k}": v for k, v in outputs.metrics.items() if k != "models"}
        run.log_comparison(summary)
        for model in outputs.models:
            prefix = f"{EVAL_PREFIX}{model.key}/"
            run.log_metrics({f"{prefix}{k}": v for k, v in model.metrics.items() if k != "per_class"})
            run.log_metrics({f"{prefix}{cls}.{k}": v for cls, values in model.metrics["per_class"].items()
                             for k, v in values.items()})
            for path in model.images.values():
                run.log_artifact(path, "plots")
        for name in ("metrics", "scores", "roc", "score_hist"):
            run.log_artifact(files[name], "evaluation")
    return outputs


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
