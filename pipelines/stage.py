"""Stage plumbing shared by the Hydra mains: which config a run uses, the CLI, progress bars and outputs. A stage's
MLflow runs are ``pipelines.execution``'s; the targets and their manifest rows' images live in ``pipelines.rows``
(re-exported here). No algorithm lives here: scoring, thresholds and metrics are ``bdi`` calls.

Where a stage's config comes from:
* run by DVC (``DVC_STAGE`` is set, as ``dvc repro`` / ``dvc exp run`` do): ``<DVC_ROOT>/params.yaml``,
  the file DVC tracks and ``dvc exp run -S key=value`` edits, validated against the schema;
* run by hand: ``conf/`` composed by Hydra with the command-line overrides
  (``python -m pipelines.fit_ok model.memory.coreset_rate=0.05``), in the current directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from omegaconf import DictConfig

from bdi.errors import BDIError
from pipelines.config import (
    PARAMS_FILE,
    PipelineConfig,
    PipelineConfigError,
    params_diff,
    to_plain,
    tracking_config,
    validate,
)
from pipelines.execution import stage_run
from pipelines.hints import override_hint
from pipelines.manifest import PipelineDataError
from pipelines.rows import (
    Target,
    build_service,
    evaluate_rows,
    load_image,
    load_mask,
    recipe_mm_per_px,
    resolve_path,
    roi_mask,
    roi_shape,
    rows_for,
    score_rows,
    targets,
)

if TYPE_CHECKING:
    from bdi.mlops.tracking import TrackingTarget

log = logging.getLogger("pipelines")

# The data helpers of pipelines.rows, re-exported: the stages import them from here with the plumbing (this
# module's own names are importable as always).
__all__ = ["Target", "build_service", "evaluate_rows", "load_image", "load_mask", "recipe_mm_per_px",
              "resolve_path", "roi_mask", "roi_shape", "rows_for", "score_rows", "targets"]

StageResultT = TypeVar("StageResultT")

# --------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class StageContext:
    """What a stage run works with: the typed config, the same as nested dicts, where it came from."""

    stage: str
    cfg: PipelineConfig
    config_dict: dict[str, Any]
    project_root: Path
    config_source: str  # "params.yaml" (DVC) | "conf/" (Hydra composition + overrides)
    overrides: tuple[str, ...]

    def path(self, relative: str) -> Path:
        return resolve_path(self.project_root, relative)

    def tracking(self) -> TrackingTarget:
        """Where this run's MLflow runs and registered models go (``tracking.*`` under the project root)."""
        return tracking_config(self.cfg).resolve(self.project_root)


def _task_overrides() -> tuple[str, ...]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return tuple(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        return ()


def stage_context(hydra_cfg: DictConfig, *, stage: str) -> StageContext:
    """Resolve the config of this run (see the module docstring) and validate it."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list CPU probes
    overrides = _task_overrides()
    if os.environ.get("DVC_STAGE"):
        root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
        if overrides:
            raise PipelineConfigError(
                f"stage '{stage}' runs under DVC and reads params.yaml; command-line overrides "
                f"{list(overrides)} would bypass it. Use `dvc exp run -S key=value` instead."
            )
        params_path = root / PARAMS_FILE
        if not params_path.is_file():
            raise PipelineConfigError(f"{params_path} is missing: run `python -m pipelines.config --write "
                                      f"{PARAMS_FILE}` in the project root")
        raw_config = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
        source = PARAMS_FILE
    else:
        root = Path.cwd()
        raw_config = to_plain(hydra_cfg)
        source = "conf/"
        params_path = root / PARAMS_FILE
        if params_path.is_file():
            tracked = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
            if params_diff(raw_config, tracked):
                log.warning("this run uses conf/ + overrides %s, which differ from %s (what DVC tracks)",
                            list(overrides), PARAMS_FILE)
    cfg = validate(raw_config, source=source)
    return StageContext(stage=stage, cfg=cfg, config_dict=to_plain(cfg), project_root=root.resolve(),
                        config_source=source, overrides=overrides)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function; when Hydra rejects an override, say which keys exist."""
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            hint = override_hint(sys.argv[1:])
            if hint:
                sys.stderr.write(f"\n{hint}\n")
        raise


@contextmanager
def stage_errors(stage: str) -> Iterator[None]:
    """Expected failures end the process with one clear line and exit code 2 (no traceback)."""
    try:
        yield
    except (PipelineConfigError, PipelineDataError, BDIError) as exc:
        sys.stderr.write(f"error: {stage}: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from exc


def execute_stage(hydra_cfg: DictConfig, *, stage: str, execute: Callable[[StageContext], Any]) -> None:
    """The body of every stage's ``@hydra.main``: resolve the config, run ``execute`` on it, and end
    expected failures as ``stage_errors`` does."""
    with stage_errors(stage):
        execute(stage_context(hydra_cfg, stage=stage))


# --------------------------------------------------------------------------------------------- progress


class ProgressBars:
    """A ``bdi.service`` progress callback ``(stage, done, total)`` drawn as one tqdm bar per stage."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = tqdm(total=total, desc=f"{self.prefix} {stage}", unit="it", leave=True, file=sys.stderr)
            self._bars[stage] = bar
        if bar.total != total:
            bar.total = total
        bar.update(max(0, done - bar.n))
        if done >= total:
            bar.close()
            del self._bars[stage]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


@contextmanager
def stage_run_with_progress(
    ctx: StageContext, run_stage: Callable[..., StageResultT]
) -> Iterator[tuple[Any, StageResultT]]:
    """Open the stage's MLflow run (``stage_run``), call ``run_stage(ctx, progress=<ProgressBars>)`` in it
    and yield ``(run, result)`` for logging; the bars are closed before the block, even on failure."""
    bars = ProgressBars(ctx.stage)
    with stage_run(ctx) as run:
        try:
            result = run_stage(ctx, progress=bars)
        finally:
            bars.close()
        yield run, result


# --------------------------------------------------------------------------------------------- outputs


def write_json(path: Path, obj: Any) -> Path:
    """Write strict JSON (NaN/inf refused) atomically with ``bdi.storage.fsio.atomic_write_bytes``, creating the
    parent folder. Unlike ``atomic_write_json`` (which lets NaN through), DVC metrics must be strict."""
    from bdi.storage.fsio import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path
