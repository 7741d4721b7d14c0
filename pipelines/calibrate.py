"""Stage 3, calibrate: score the held-out ``calib`` OK/NG images and store the threshold of every model.

The fitted ModelStore (``paths.fit_dir``, an output of fit_ok that this stage must not modify) is
copied to ``paths.model_dir``; ``InspectionService.calibrate_from_scores`` (the library rule of
docs/contract.md "Threshold rule", as ``/calibrate_ng``) then writes each model's calib.json there, recording the
memory it belongs to. ``paths.model_dir`` is the deployable ModelStore: memory + index + calibration.

It also reports the selection metrics of tuning on the calib split, image and pixel AUROC (where the rows
have masks), with the evaluate stage's code (``evaluate_rows``), to ``paths.calib_metrics`` (a DVC metrics file,
``calib_image_auroc`` / ``calib_pixel_auroc``; top level = mean over models) and to MLflow. In MLflow every figure
of this stage is ``calib/<name>`` (``calib/threshold``, ``calib/false_reject_rate``, ``calib/image_auroc`` …), on the
stage's run and on the execution's parent run, beside evaluate's ``eval/<name>``; with NG images (and
``calibration.band``) the OK / review / NG band is set too and logged as ``calib/threshold_low``,
``calib/threshold_high``, ``calib/review_rate``, ``calib/band_escape_rate``, ``calib/band_false_reject_rate``;
calib.json's ``p99_ok`` / ``p5_ng``
are logged as ``ok_score_at_percentile`` / ``ng_score_at_percentile``, the percentiles as the params
``threshold.ok_percentile`` / ``threshold.ng_percentile``. Tuning compares these, never the eval split's figures.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from bdi.storage.fsio import staged_dir
from pipelines.manifest import PipelineDataError, read_manifest
from pipelines.stage import (
    StageContext,
    build_service,
    evaluate_rows,
    execute_stage,
    recipe_mm_per_px,
    rows_for,
    run_cli,
    score_rows,
    stage_run_with_progress,
    targets,
    write_json,
)

if TYPE_CHECKING:
    from bdi.patchcore.calibration import Calibration

log = logging.getLogger("pipelines.calibrate")
STAGE = "calibrate"
SELECTION_KEYS = ("image_auroc", "pixel_auroc")  # logged with a ``calib_`` prefix


@dataclass(frozen=True)
class CalibrationOutcome:
    key: str
    calib: Calibration
    scores: list[dict[str, Any]]  # file, label, defect_class, score
    selection: dict[str, float | None]  # calib_image_auroc, calib_pixel_auroc (None: undefined on the split)


def run_calibrate(
    ctx: StageContext, *, progress: Any | None = None
) -> list[CalibrationOutcome]:
    """Copy the fitted store, calibrate every target in it, then replace ``paths.model_dir``."""
    cfg = ctx.cfg
    manifest = read_manifest(ctx.path(cfg.paths.manifest))
    fit_dir = ctx.path(cfg.paths.fit_dir)
    if not fit_dir.is_dir():
        raise PipelineDataError(f"{fit_dir} (paths.fit_dir) is missing: run the fit_ok stage first")
    outcomes: list[CalibrationOutcome] = []
    with staged_dir(ctx.path(cfg.paths.model_dir)) as staged:
        shutil.copytree(fit_dir, staged)
        service = build_service(ctx, models_dir=staged)
        scoring = service.settings.model.scoring
        for target in targets(cfg):
            rows = rows_for(manifest, target, "calib")
            images, results = score_rows(service, target=target, rows=rows, root=ctx.project_root,
                                          scoring=scoring, progress=progress)
            ok = [res.score for res, row in zip(results, rows, strict=True) if row.label == "ok"]
            ng = [res.score for res, row in zip(results, rows, strict=True) if row.label == "ng"]
            if not ok:
                raise PipelineDataError(f"no OK calibration image for {target.key}: the calib split needs "
                                        "test/good images (or OK server samples)")
            calib = service.calibrate_from_scores(
                ref=target.ref, ok_scores=ok, ng_scores=ng or None, mm_per_px=recipe_mm_per_px(manifest, target),
                score_percentile=scoring.score_percentile, area_mm2_thr=scoring.area_mm2_thr, band=True,
                ok_images=[image for image, row in zip(images, rows, strict=True) if row.label == "ok"],
            )
            scores = [{"file": row.file, "label": row.label, "defect_class": row.defect_class,
                       "score": float(res.score)} for res, row in zip(results, rows, strict=True)]
            report = evaluate_rows(ctx, rows=rows, results=results, threshold=calib.threshold)
            selection = {f"calib_{k}": report.overall[k] for k in SELECTION_KEYS}
            outcomes.append(CalibrationOutcome(key=target.key, calib=calib, scores=scores, selection=selection))
            log.info("calibrate %s: threshold %.6g from %d OK / %d NG", target.key, calib.threshold,
                     len(ok), len(ng))
            if calib.band is not None:
                log.info("calibrate %s: band [%.6g, %.6g) review %.3g escape %.3g false reject %.3g%s", target.key,
                         calib.band.threshold_low, calib.band.threshold_high, calib.band.review_rate or 0.0,
                         calib.band.escape_rate or 0.0, calib.band.false_reject_rate or 0.0,
                         " (collapsed)" if calib.band.collapsed else "")
    return outcomes


def selection_metrics(outcomes: list[CalibrationOutcome]) -> dict[str, Any]:
    """The ``paths.calib_metrics`` content: each selection metric's mean over the models (None when undefined
    for all) and every model's own under ``models``."""
    out: dict[str, Any] = {}
    for key in (f"calib_{k}" for k in SELECTION_KEYS):
        values = [v for o in outcomes if (v := o.selection[key]) is not None and math.isfinite(v)]
        out[key] = sum(values) / len(values) if values else None
    out["models"] = {o.key: o.selection for o in outcomes}
    return out


# calib.json's statistics under names that say what they hold: ``p99_ok`` is the OK score at the *applied*
# ``score_percentile`` (100 for the CNNs), ``p5_ng`` the NG score at ``calibration.ng_percentile``
HONEST_NAMES = {"p99_ok": "ok_score_at_percentile", "p5_ng": "ng_score_at_percentile"}
CALIB_PREFIX = "calib/"  # every figure of this stage is on the calib split; evaluate's are ``eval/``


def threshold_rule(ctx: StageContext, outcome: CalibrationOutcome) -> dict[str, Any]:
    """The threshold rule as params: the percentiles it applied and the rule in words (docs/contract.md)."""
    cal = ctx.cfg.calibration
    ok_p, ng_p = outcome.calib.score_percentile, cal.ng_percentile
    rule = {"threshold.ok_percentile": ok_p, "threshold.ng_percentile": ng_p,
            "threshold.rule": f"p{ok_p:g} of OK scores; with NG scores: {cal.overlap_factor:g} x p{ok_p:g}(OK) when "
                              f"p{ng_p:g}(NG) <= it, else their midpoint"}
    band = outcome.calib.band
    if band is not None:
        rule.update({"band.escape_budget": band.escape_budget, "band.false_reject_budget": band.false_reject_budget,
                     "band.review_decision": cal.review_decision})
    return rule


def calibration_metrics(outcome: CalibrationOutcome) -> dict[str, float | None]:
    """One model's figures on the calib split, unprefixed: threshold, rates, statistics (honest names), counts
    and the selection metrics (``image_auroc``, ``pixel_auroc``)."""
    values = {HONEST_NAMES.get(k, k): v for k, v in outcome.calib.metrics().items()}
    values.update({k.removeprefix("calib_"): v for k, v in outcome.selection.items()})
    return values


def execute(ctx: StageContext) -> list[CalibrationOutcome]:
    with stage_run_with_progress(ctx, run_calibrate) as (run, outcomes):
        row: dict[str, Any] = {}
        for outcome in outcomes:
            prefix = f"{CALIB_PREFIX}{outcome.key}/" if len(outcomes) > 1 else CALIB_PREFIX
            row.update({f"{prefix}{k}": v for k, v in calibration_metrics(outcome).items()})
            name = outcome.key.replace("/", "__")
            run.log_dict(outcome.calib.to_dict(), f"calibration/{name}.calib.json")
            run.log_dict({"scores": outcome.scores}, f"calibration/{name}.scores.json")
        summary = selection_metrics(outcomes)
        if len(outcomes) > 1:  # the means over the models, for the comparison row
            row.update({f"{CALIB_PREFIX}{k.removeprefix('calib_')}": v for k, v in summary.items() if k != "models"})
        run.log_comparison(row)
        if len(outcomes) == 1:
            rule = threshold_rule(ctx, outcomes[0])
            run.log_params(rule)
            run.parent.log_params(rule)
        run.log_artifact(write_json(ctx.path(ctx.cfg.paths.calib_metrics), summary), "calibration")
    return outcomes


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
