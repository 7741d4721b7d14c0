"""Stage 2, fit_ok: build the PatchCore memory of every (recipe, role, roi) from its ``train`` images.

Calls ``InspectionService.fit_images`` (the code path of ``/fit_ok``) into a fresh ModelStore root at
``paths.fit_dir`` and locks the recipe's ``mm_per_px`` there, so the output has the server's layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bdi.service import FitResult
from bdi.storage.fsio import staged_dir
from pipelines.manifest import PipelineDataError, read_manifest
from pipelines.stage import (
    StageContext,
    build_service,
    execute_stage,
    load_image,
    recipe_mm_per_px,
    roi_shape,
    rows_for,
    run_cli,
    stage_run_with_progress,
    targets,
    write_json,
)

log = logging.getLogger("pipelines.fit_ok")
STAGE = "fit_ok"
SUMMARY_FILE = "fit_summary.json"  # next to recipes/ in paths.fit_dir; the ModelStore ignores it


# the FitResult fields fit_summary.json records for each target, in its key order
SUMMARY_FIELDS = ("n_images", "n_embeddings", "coreset_size", "coreset_rate_applied", "fingerprint", "timings_ms")


@dataclass(frozen=True)
class FitOutcome:
    """One target's fit: its key and what the service returned."""

    key: str
    result: FitResult

    def summary(self) -> dict[str, Any]:
        """The target's entry in fit_summary.json."""
        return {"key": self.key, **{name: getattr(self.result, name) for name in SUMMARY_FIELDS}}


def run_fit_ok(ctx: StageContext, *, progress: Any | None = None) -> list[FitOutcome]:
    """Fit every target into a staging folder, then replace ``paths.fit_dir`` with it."""
    manifest = read_manifest(ctx.path(ctx.cfg.paths.manifest))
    outcomes: list[FitOutcome] = []
    with staged_dir(ctx.path(ctx.cfg.paths.fit_dir)) as staged:
        service = build_service(ctx, models_dir=staged)
        for target in targets(ctx.cfg):
            rows = rows_for(manifest, target, "train")
            if not rows:
                raise PipelineDataError(f"no train images for {target.key} in the manifest")
            images = [load_image(ctx.project_root, row) for row in rows]
            result = service.fit_images(ref=target.ref, mm_per_px=recipe_mm_per_px(manifest, target), images=images,
                                        shapes=[roi_shape(row) for row in rows], progress=progress)
            outcomes.append(FitOutcome(key=target.key, result=result))
            log.info("fit %s: %d images, %d patches -> coreset %d", target.key, result.n_images,
                     result.n_embeddings, result.coreset_size)
        write_json(staged / SUMMARY_FILE, {"models": [o.summary() for o in outcomes],
                                           "features": service.extractor.describe()})
    return outcomes


def execute(ctx: StageContext) -> list[FitOutcome]:
    with stage_run_with_progress(ctx, run_fit_ok) as (run, outcomes):
        for outcome in outcomes:
            prefix = f"fit/{outcome.key}/" if len(outcomes) > 1 else "fit/"
            result = outcome.result
            figures = {f"{prefix}n_images": result.n_images, f"{prefix}n_embeddings": result.n_embeddings,
                       f"{prefix}coreset_size": result.coreset_size,
                       f"{prefix}coreset_rate_applied": result.coreset_rate_applied}
            run.log_metrics({**figures, **{f"{prefix}timings_ms.{k}": v for k, v in result.timings_ms.items()}})
        run.set_tags({"memory_fingerprints": ",".join(o.result.fingerprint for o in outcomes)})
        run.log_artifact(Path(ctx.path(ctx.cfg.paths.fit_dir)) / SUMMARY_FILE, "fit")
    return outcomes


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
