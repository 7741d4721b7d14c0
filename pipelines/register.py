"""Stage 5, register: every calibrated model becomes an MLflow model version (``bdi.registry``).

For each (recipe, role, roi): the model is exported alone into a temporary ModelStore root
(``bdi.registry.export_model_dir``), logged as a pyfunc in this stage's run and registered; the alias
(``tracking.alias``) moves to it only when its ``evaluation.primary_metric`` is at least the current
holder's. ``paths.registration`` records the versions (small, so DVC re-runs nothing downstream).
Deploy with ``bdi sync --models-dir DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipelines.config import tracking_config
from pipelines.stage import (
    PipelineDataError,
    StageContext,
    execute_stage,
    run_cli,
    run_tags,
    stage_run,
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


def run_register(ctx: StageContext, *, run_id: str) -> list[dict[str, Any]]:
    """Register every target's model from ``paths.model_dir`` into run ``run_id``; one record each."""
    from bdi.registry import export_model_dir, register_model
    from bdi.store import ModelStore

    cfg = ctx.cfg
    model_dir = ctx.path(cfg.paths.model_dir)
    metrics_path = ctx.path(cfg.paths.metrics)
    if not model_dir.is_dir() or not metrics_path.is_file():
        raise PipelineDataError(f"{model_dir} or {metrics_path} is missing: run calibrate and evaluate first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    store = ModelStore(model_dir)
    tracking = tracking_config(cfg)
    base_tags = {k: v for k, v in run_tags(ctx).items() if k not in ("stage", "source", "overrides")}
    records: list[dict[str, Any]] = []
    for target in targets(cfg):
        values = model_metrics(metrics, target.key)
        calib = store.load_calibration(target.ref) or {}
        with tempfile.TemporaryDirectory(prefix="bdi-register-") as tmp:
            export_model_dir(store=store, ref=target.ref, dest=Path(tmp))
            result = register_model(
                cfg=tracking, project_root=ctx.project_root, run_id=run_id, model_dir=Path(tmp), ref=target.ref,
                metrics=values, tags={**base_tags, "threshold": str(calib.get("threshold"))},
                primary_metric=cfg.evaluation.primary_metric,
            )
        records.append({"model": target.key, **asdict(result), "run_id": run_id,
                        "threshold": calib.get("threshold"),
                        cfg.evaluation.primary_metric: values.get(cfg.evaluation.primary_metric)})
        log.info("registered %s as %s v%d (alias %s %s)", target.key, result.name, result.version, result.alias,
                 "moved" if result.alias_moved else f"kept on v{result.previous_version}")
    return records


def execute(ctx: StageContext) -> list[dict[str, Any]]:
    out = ctx.path(ctx.cfg.paths.registration)
    if not ctx.cfg.tracking.enabled:
        log.warning("tracking.enabled is false: nothing registered")
        write_json(out, {"enabled": False, "models": []})
        return []
    with stage_run(ctx) as run:
        records = run_register(ctx, run_id=run.run_id)
        run.log_dict({"models": records}, "registration.json")
    write_json(out, {"enabled": True, "models": records})
    return records


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
