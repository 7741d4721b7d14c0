"""Stage 2, fit_ok: build the PatchCore memory of every (recipe, role, roi) from its ``train`` images.

Calls ``InspectionService.fit_images`` (the code path of ``/fit_ok``) into a fresh ModelStore root at
``paths.fit_dir`` and locks the recipe's ``mm_per_px`` there, so the output has the server's layout.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bdi.storage.fsio import staged_dir
from pipelines.manifest import PipelineDataError, read_manifest
from pipelines.stage import (
    StageContext,
    build_service,
    execute_stage,
    load_image,
    recipe_mm_per_px,
    rows_for,
    run_cli,
    stage_run_with_progress,
    targets,
    write_json,
)

log = logging.getLogger("pipelines.fit_ok")
STAGE = "fit_ok"
SUMMARY_FILE = "fit_summary.json"  # next to recipes/ in paths.fit_dir; the ModelStore ignores it


@dataclass(frozen=True)
class FitOutcome:
    key: str
    n_images: int
    n_embeddings: int
    coreset_size: int
    coreset_rate_applied: float
    fingerprint: str
    timings_ms: dict[str, float]


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
                                        progress=progress)
            outcomes.append(FitOutcome(
                key=target.key, n_images=result.n_images, n_embeddings=result.n_embeddings,
                coreset_size=result.coreset_size, coreset_rate_applied=result.coreset_rate_applied,
                fingerprint=result.fingerprint, timings_ms=dict(result.timings_ms),
            ))
            log.info("fit %s: %d images, %d patches -> coreset %d", target.key, result.n_images,
                     result.n_embeddings, result.coreset_size)
        write_json(staged / SUMMARY_FILE, {"models": [asdict(o) for o in outcomes],
                                           "features": service.extractor.describe()})
    return outcomes


def execute(ctx: StageContext) -> list[FitOutcome]:
    with stage_run_with_progress(ctx, run_fit_ok) as (run, outcomes):
        for outcome in outcomes:
            prefix = f"{outcome.key}/" if len(outcomes) > 1 else ""
            run.log_metrics({f"{prefix}n_images": outcome.n_images, f"{prefix}n_embeddings": outcome.n_embeddings,
                             f"{prefix}coreset_size": outcome.coreset_size,
                             f"{prefix}coreset_rate_applied": outcome.coreset_rate_applied,
                             **{f"{prefix}timings_ms.{k}": v for k, v in outcome.timings_ms.items()}})
        run.set_tags({"memory_fingerprints": ",".join(o.fingerprint for o in outcomes)})
        run.log_artifact(Path(ctx.path(ctx.cfg.paths.fit_dir)) / SUMMARY_FILE, "fit")
    return outcomes


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
