"""Stage 5, register: every calibrated model becomes an MLflow model version (``bdi.registry``).

For each (recipe, role, roi): the model is exported alone into a temporary ModelStore root
(``bdi.registry.export_model_dir``) with the parity-checked export of its feature net in ``exports/<key>``
(``bdi.export``; made now when the machine's export cache lacks it, left out with a warning when no runtime
passes), logged as a pyfunc in this stage's run and registered; the alias
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
        from bdi.features import FeatureExtractor

        if self._extractor is None:
            settings = self._settings
            self._extractor = FeatureExtractor(settings.feature_config(), cache_dir=settings.weights_cache_dir)
        return self._extractor

    def into(self, model_dir: Path, *, signature: dict[str, Any]) -> str:
        """Copy the export into ``model_dir/exports/<key>``; returns the key, "" when none could be made."""
        from bdi.acceleration import checked_export_for
        from bdi.config import EXPORTS_DIRNAME
        from bdi.errors import ExportError
        from bdi.export import copy_export

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
    carry = ExportCarrier(ctx, model_dir=model_dir)
    for target in targets(cfg):
        values = model_metrics(metrics, target.key)
        calib = store.load_calibration(target.ref) or {}
        with tempfile.TemporaryDirectory(prefix="bdi-register-") as tmp:
            export_model_dir(store=store, ref=target.ref, dest=Path(tmp))
            key = carry.into(Path(tmp), signature=_memory_signature(store, target.ref))
            result = register_model(
                cfg=tracking, project_root=ctx.project_root, run_id=run_id, model_dir=Path(tmp), ref=target.ref,
                metrics=values, tags={**base_tags, "threshold": str(calib.get("threshold")), "export_key": key},
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
