"""Stage 5, register: every calibrated model becomes an MLflow model version (``bdi.mlops.registration``).

For each (recipe, role, roi): the model is exported alone into a temporary ModelStore root
(``bdi.mlops.registration.export_model_dir``) with its golden images (a few eval images and the scores this
pipeline gave them) and the parity-checked export of its feature net in ``exports/<key>`` (``bdi.runtime.export``;
made now when the machine's export cache lacks it, left out with a warning when no runtime passes), logged
as a pyfunc in this stage's run and registered with its lineage tags (git commit, the dataset's md5 from
``dvc.lock``, the calibrate run). The alias (``tracking.alias``) moves to it only when it passes the
promotion gate (``promotion.*``, ``bdi.mlops.promotion``): primary metric not below the holder's, false-reject
rate, /infer latency and export parity through the serving path. ``paths.registration`` records the
versions and gate reports (small, so DVC re-runs nothing downstream). Servers following the registry
pick the new champion up; ``bdi sync`` does it by hand.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipelines.config import model_config
from pipelines.execution import dataset_identity, dvc_data_hash, run_tags, stage_run
from pipelines.manifest import PipelineDataError, read_manifest
from pipelines.sources import ingested_folder, rel_path
from pipelines.stage import (
    StageContext,
    execute_stage,
    recipe_mm_per_px,
    resolve_path,
    rows_for,
    run_cli,
    targets,
    write_json,
)

log = logging.getLogger("pipelines.register")
STAGE = "register"


def model_metrics(metrics: dict[str, Any], key: str) -> dict[str, float]:
    """The finite metrics of one model from metrics.json (per class as ``<class>.<name>``)."""
    entry = (metrics.get("models") or {}).get(key)
    if entry is None:
        raise PipelineDataError(f"metrics.json has no entry for {key}: run the evaluate stage again")
    out: dict[str, float] = {}
    for name, value in entry.items():
        if name == "per_class":
            for cls, values in (value or {}).items():
                for sub, v in values.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        out[f"{cls}.{sub}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def golden_items(ctx: StageContext, *, target: Any, manifest: Any, scores: Any) -> list[tuple[bytes, str, Any]]:
    """Up to ``promotion.golden_images`` eval images of ``target`` with the scores the evaluate stage gave
    them: the export-parity set logged with the version (``bdi.mlops.promotion.write_golden_set``)."""
    from bdi.mlops.promotion import GoldenImage

    n = ctx.cfg.promotion.golden_images
    if n <= 0:
        return []
    expected = {str(r["file"]): float(r["score"]) for r in scores.to_dict("records") if r["model"] == target.key}
    rows = [r for r in rows_for(manifest, target, "eval") if r.file in expected]
    picked = rows[:: max(1, len(rows) // n)][:n]  # spread over the classes (rows are ordered by class)
    mm_per_px = recipe_mm_per_px(manifest, target)
    items = []
    for row in picked:
        path = resolve_path(ctx.project_root, row.file)
        record = GoldenImage(file=path.name, expected_score=expected[row.file], mm_per_px=mm_per_px,
                             shape=row.roi_shape or None, source=row.file)
        items.append((path.read_bytes(), path.suffix or ".png", record))
    return items


def calibration_run_id(ctx: StageContext) -> str | None:
    """The MLflow run of the calibrate stage that made these thresholds (same config hash, latest)."""
    config_hash = run_tags(ctx).get("config_hash")
    tracking = ctx.tracking()
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None or not config_hash:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.stage = 'calibrate' and tags.config_hash = '{config_hash}'")
    return str(runs[0].info.run_id) if runs else None


def ingested_source(ctx: StageContext) -> str:
    """The folder the ingest stage read, relative to the project root: its report's ``source`` (for the default
    ``dataset=auto``, the server's samples under ``dataset.source`` or the discs generated into
    ``dataset.synthetic.folder``), ``dataset.source`` when there is no report."""
    return rel_path(ingested_folder(ctx.cfg, root=ctx.project_root), ctx.project_root)


def promotion_gate(cfg: Any) -> Any:
    """``bdi.mlops.promotion.PromotionGate`` from the ``promotion`` section (+ ``evaluation.primary_metric``)."""
    from bdi.mlops.promotion import PromotionGate

    p = cfg.promotion
    return PromotionGate(primary_metric=cfg.evaluation.primary_metric, max_false_reject_rate=p.max_false_reject_rate,
                         max_infer_latency_ms=p.max_infer_latency_ms, parity_eps=p.parity_eps,
                         max_review_rate=p.max_review_rate)


def _memory_signature(store: Any, ref: Any) -> dict[str, Any]:
    memory = store.load_memory(ref)
    signature = memory.metadata.get("signature") if memory is not None else None
    return dict(signature) if isinstance(signature, dict) else {}


class ExportCarrier:
    """Puts the parity-checked export of a model's feature net into the folder being registered.

    The export comes from the machine's cache (``Settings.exports_dir()``), made and checked there when
    missing; the extractor for that is built at most once per stage run.
    """

    def __init__(self, ctx: StageContext, *, model_dir: Path) -> None:
        from pipelines.config import to_settings

        self._settings = to_settings(ctx.cfg, models_dir=model_dir, project_root=ctx.project_root)
        self._extractor: Any = None

    def _build_extractor(self) -> Any:
        from bdi.patchcore.features import FeatureExtractor

        if self._extractor is None:
            settings = self._settings
            self._extractor = FeatureExtractor(settings.model.features, cache_dir=settings.weights_cache_dir)
        return self._extractor

    def into(self, model_dir: Path, *, signature: dict[str, Any]) -> str:
        """Copy the export into ``model_dir/exports/<key>``; returns the key, "" when none could be made."""
        from bdi.config import EXPORTS_DIRNAME
        from bdi.errors import ExportError
        from bdi.runtime.export import copy_export
        from bdi.runtime.select import checked_export_for

        if not signature:
            log.warning("the memory records no feature signature: registered without an export")
            return ""
        root = self._settings.exports_dir()
        try:
            export = checked_export_for(signature, root=root, threads=self._settings.intra_op_threads(),
                                        build_extractor=self._build_extractor)
            copy_export(src_root=root, dst_root=model_dir / EXPORTS_DIRNAME, key=export.manifest.key)
        except ExportError as exc:
            log.warning("registered without an export of the feature net (it serves on torch): %s", exc)
            return ""
        return export.manifest.key


def run_register(ctx: StageContext, *, run_id: str) -> list[dict[str, Any]]:
    """Register every target's model from ``paths.model_dir`` into run ``run_id`` and promote it through
    the gate (``promotion``); one record each."""
    import pandas as pd

    from bdi.mlops.promotion import promote_version, write_golden_set
    from bdi.mlops.registration import export_model_dir, register_model
    from bdi.storage.store import ModelStore

    cfg = ctx.cfg
    model_dir = ctx.path(cfg.paths.model_dir)
    metrics_path = ctx.path(cfg.paths.metrics)
    if not model_dir.is_dir() or not metrics_path.is_file():
        raise PipelineDataError(f"{model_dir} or {metrics_path} is missing: run calibrate and evaluate first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    manifest = read_manifest(ctx.path(cfg.paths.manifest))
    scores = pd.read_csv(ctx.path(cfg.paths.scores))
    store = ModelStore(model_dir)
    tracking = ctx.tracking()
    base_tags = {k: v for k, v in run_tags(ctx).items() if k not in ("stage", "source", "overrides")}
    dataset = dataset_identity(ctx, split=None)
    read = ingested_source(ctx)
    lineage_tags = {
        "git_commit": base_tags.get("dvc_commit"),
        "data_hash": dvc_data_hash(ctx.project_root, source=read),
        "data_source": read,
        "dataset_digest": dataset.digest if dataset is not None else None,
        "calibration_run_id": calibration_run_id(ctx),
    }
    gate = promotion_gate(cfg)
    overrides: dict[str, str] = {"device": cfg.model.features.device}
    if cfg.paths.weights_cache_dir:
        overrides["weights_cache_dir"] = str(ctx.path(cfg.paths.weights_cache_dir))
    records: list[dict[str, Any]] = []
    carry = ExportCarrier(ctx, model_dir=model_dir)
    scoring = model_config(cfg).scoring
    for target in targets(cfg):
        values = model_metrics(metrics, target.key)
        calib = store.calibrations.load(target.ref, defaults=scoring)
        threshold = calib.threshold if calib is not None else None
        with tempfile.TemporaryDirectory(prefix="bdi-register-") as tmp:
            export_model_dir(store=store, ref=target.ref, dest=Path(tmp))
            write_golden_set(Path(tmp), golden_items(ctx, target=target, manifest=manifest, scores=scores))
            key = carry.into(Path(tmp), signature=_memory_signature(store, target.ref))
            result = register_model(
                tracking=tracking, run_id=run_id, model_dir=Path(tmp), ref=target.ref,
                metrics=values, primary_metric=cfg.evaluation.primary_metric, move_alias=False,
                tags={**base_tags, **{k: v for k, v in lineage_tags.items() if v},
                      "threshold": str(threshold), "export_key": key},
            )
        link_model_metrics(ctx, run_id=run_id, name=result.name, version=result.version, metrics=values)
        promotion = promote_version(tracking=tracking, name=result.name,
                                    version=result.version, gate=gate, overrides=overrides)
        report = promotion.report.to_dict() if promotion.report is not None else None
        records.append({"model": target.key, **asdict(result), "alias_moved": promotion.moved, "run_id": run_id,
                        "threshold": threshold, "gate": report,
                        cfg.evaluation.primary_metric: values.get(cfg.evaluation.primary_metric)})
        records[-1]["verdict"] = verdict(promotion)
        log.info("registered %s as %s v%d", target.key, result.name, result.version)
        for check in promotion.report.failures() if promotion.report is not None else ():
            log.warning("promotion gate: %s failed: %s", check.name, check.detail)
    return records


def logged_model_id(version: Any) -> str | None:
    """The ``LoggedModel`` id of a model version: its ``model_id`` or, where the SQL registry does not return it,
    the id in its source URI (``models:/<model_id>``)."""
    model_id = getattr(version, "model_id", None)
    source = str(getattr(version, "source", "") or "")
    if not model_id and source.startswith("models:/m-"):
        model_id = source.removeprefix("models:/").split("/")[0]
    return str(model_id) if model_id else None


def link_model_metrics(ctx: StageContext, *, run_id: str, name: str, version: int, metrics: dict[str, float]) -> None:
    """Log the version's evaluation figures (``eval/<name>``) linked to its MLflow 3 ``LoggedModel`` (``model_id``)
    and to the eval split's dataset (name + digest), so MLflow's Models view compares versions by them."""
    from mlflow.entities import Metric

    from bdi.mlops.tracking import global_tracking_uri

    tracking = ctx.tracking()
    client = tracking.client()
    with global_tracking_uri(tracking.tracking_uri):
        registered = client.get_model_version(name, str(version))
    model_id = logged_model_id(registered)
    if not model_id:
        return
    dataset = dataset_identity(ctx, split="eval")
    now = int(time.time() * 1000)
    linked = [Metric(f"eval/{k}", v, now, 0, model_id=model_id,
                     dataset_name=dataset.name if dataset else None, dataset_digest=dataset.digest if dataset else None)
              for k, v in metrics.items()]
    client.log_batch(run_id, metrics=linked)


# what to change when a check refuses a version, by check name (the primary metric's is the default)
CHANGE_HINTS = {
    "false_reject_rate": "the calibration (calibration.*, model.scoring.score_percentile) or the model so fewer OK "
                         "images score over the threshold, or the limit promotion.max_false_reject_rate",
    "review_rate": "the band's budgets (calibration.escape_budget, calibration.false_reject_budget) or the model so "
                   "fewer parts fall between its thresholds, or the limit promotion.max_review_rate",
    "infer_latency_ms": "a lighter model (model.features.backbone / input_size), or the budget "
                        "promotion.max_infer_latency_ms, or promote on the line's hardware (`bdi promote`)",
    "export_parity": "nothing in the config: the served scores differ from the pipeline's; re-run register, and "
                     "report it if it persists",
}


def verdict(promotion: Any) -> str:
    """One line saying what happened to the alias, why, and (refused) what to change."""
    where = f"{promotion.name} v{promotion.version}"
    if promotion.moved:
        was = f" (was v{promotion.previous_version})" if promotion.previous_version is not None else " (first champion)"
        return f"promoted: {promotion.alias} -> {where}{was}"
    failures = promotion.report.failures() if promotion.report is not None else []
    why = "; ".join(f"{c.name}: {c.detail}" for c in failures) or "the gate refused it"
    change = "; ".join(dict.fromkeys(CHANGE_HINTS.get(c.name, f"the model, so its {c.name} is not below the "
                                                           "champion's") for c in failures))
    if promotion.previous_version is None:
        return f"REFUSED: no {promotion.alias} yet: {where} refused because {why}. Change {change}"
    return (f"REFUSED: {where} refused because {why}; {promotion.alias} stays on v{promotion.previous_version}. "
            f"Change {change}")


STRICT_ENV = "BDI_PROMOTION_STRICT"  # "1": a refused promotion ends the stage with REFUSED_EXIT_CODE
REFUSED_EXIT_CODE = 3


def comparison_row(records: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's promotion metrics and tags: ``promotion/promoted`` (1/0, all models),
    ``registered_version`` (one model) and the verdict lines."""
    metrics: dict[str, float] = {"promotion/promoted": float(all(r["alias_moved"] for r in records)),
                                 "promotion/refused": float(sum(not r["alias_moved"] for r in records))}
    tags = {"promotion.verdict": " | ".join(r["verdict"] for r in records)[:5000],
            "promotion.passed": str(all(r["alias_moved"] for r in records)).lower()}
    if len(records) == 1:
        metrics["registered_version"] = float(records[0]["version"])
        tags.update(registered_model=records[0]["name"], registered_version=str(records[0]["version"]))
    return metrics, tags


def execute(ctx: StageContext) -> list[dict[str, Any]]:
    out = ctx.path(ctx.cfg.paths.registration)
    if not ctx.cfg.tracking.enabled:
        log.warning("tracking.enabled is false: nothing registered")
        write_json(out, {"enabled": False, "models": []})
        return []
    with stage_run(ctx) as run:
        records = run_register(ctx, run_id=run.run_id)
        run.log_dict({"models": records}, "registration.json")
        metrics, tags = comparison_row(records)
        for handle in (run, run.parent):
            handle.log_metrics(metrics)
            handle.set_tags(tags)
    refused = [r for r in records if not r["alias_moved"]]
    write_json(out, {"enabled": True, "promoted": int(not refused), "refused": len(refused),
                     "registered_version": records[0]["version"] if len(records) == 1 else None,
                     "models": records})
    for record in records:  # the stage's last lines: the verdicts, on stdout (dvc shows it)
        sys.stdout.write(f"register: {record['model']}: {record['verdict']}\n")
    sys.stdout.flush()
    if refused and os.environ.get(STRICT_ENV) == "1":
        sys.stderr.write(f"error: register: {len(refused)} promotion(s) refused and {STRICT_ENV}=1\n")
        raise SystemExit(REFUSED_EXIT_CODE)
    return records


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
