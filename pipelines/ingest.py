"""Stage 1, ingest: list and validate the dataset, split it, write the manifest and a rejection report.

Sources (``dataset.kind``; which folder, and the synthetic discs ``auto``/``synthetic`` generate:
``pipelines.sources``), listed in one of two layouts:
* MVTec: ``<source>[/<roi.subdir>]/train/good``, ``test/<class>``, ``ground_truth/<class>/<stem>_mask.png``
  (``bdi.data.mvtec.read_mvtec``): ``mvtec``, ``synthetic``, ``auto`` without server samples;
* server: the GUI's sample folders in a ModelStore root (``bdi.storage.datasets.DatasetStore``), ``ok``/``ng``;
  a sample's sidecar ``mm_per_px`` / ``shape_json`` win over the dataset config: ``server``, ``auto`` with them.

Validation (``bdi.data.checks.check_sample``; each failure rejects one file with a reason, the rest is kept):
readable, decodable, channel count in ``dataset.channels``, both sides ≥ ``dataset.min_size``, at most
``dataset.max_pixels``, a valid ``mm_per_px``; a mask must decode and have the image's size; an exact duplicate
(same sha256) of an earlier file of the same model is rejected (no image may be both fitted and tested).

Splits (``bdi.data.splits``, the one home of the rule, shared with ``bench.quality``): deterministic and
stratified; within every (model, label, defect class) group the files are ordered by sha256 and dealt out in
that order, so a split never depends on file names or listing order. ``mvtec``: train/good → ``train``; each
test class → ``calib`` (a ``splits.calib_fraction`` share, interleaved) and ``eval`` (the rest). ``server``:
OK samples → ``train`` (``splits.train_fraction``), the remaining OK and all NG samples → ``calib`` /
``eval`` as above.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from bdi.data.splits import SplitItem
from bdi.data.splits import assign_splits as assign_splits_rule
from bdi.errors import BDIError
from pipelines.config import PipelineConfig, PipelineConfigError
from pipelines.execution import log_dataset, stage_run
from pipelines.manifest import SPLITS, ManifestRow, PipelineDataError, write_manifest
from pipelines.sources import check_source, missing_folder_error, rel_path, resolve_source
from pipelines.stage import (
    StageContext,
    Target,
    execute_stage,
    resolve_path,
    run_cli,
    targets,
    write_json,
)

if TYPE_CHECKING:
    from bdi.data.checks import SampleFacts

log = logging.getLogger("pipelines.ingest")
STAGE = "ingest"


@dataclass(frozen=True)
class Candidate:
    """A file found in the source, before validation."""

    path: Path
    label: str  # ok | ng
    defect_class: str  # good | <class> | ng (server)
    source_split: str  # train | test (mvtec) | pool (server)
    mask_path: Path | None
    mm_per_px: float
    roi_shape: str  # JSON text, "" = full image


@dataclass
class IngestResult:
    rows: list[ManifestRow]
    rejected: list[dict[str, str]]
    warnings: list[str] = field(default_factory=list)
    n_found: int = 0
    source: dict[str, Any] = field(default_factory=dict)  # Source.report: what was read, generated or not

    def report(self, cfg: PipelineConfig) -> dict[str, Any]:
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for row in self.rows:
            key = f"{row.recipe}/{row.role}/{row.roi}"
            split = counts.setdefault(key, {}).setdefault(row.split, {})
            split[row.defect_class] = split.get(row.defect_class, 0) + 1
        return {
            "source": self.source.get("folder", cfg.dataset.source),  # the folder read
            "kind": cfg.dataset.kind,
            "dataset": {"name": cfg.dataset.name, "source": cfg.dataset.source, **self.source},
            "n_found": self.n_found,
            "n_kept": len(self.rows),
            "n_rejected": len(self.rejected),
            "rejected": self.rejected,
            "rejected_by_reason": dict(Counter(r["reason"].split(":")[0] for r in self.rejected)),
            "warnings": self.warnings,
            "counts": counts,
        }


# --------------------------------------------------------------------------------------------- listing


def _shape_text(shape: Any) -> str:
    from bdi.patchcore.imaging import parse_shape

    parsed = parse_shape(shape) if shape not in (None, "") else None
    return json.dumps(parsed, sort_keys=True) if parsed else ""


def _mvtec_candidates(root: Path, target: Target, cfg: PipelineConfig) -> list[Candidate]:
    from bdi.data.mvtec import read_mvtec

    tree = root / target.subdir if target.subdir else root
    if not tree.is_dir():
        raise missing_folder_error(cfg, tree)
    try:
        items = read_mvtec(tree)
    except BDIError as exc:  # InvalidInputError: not an MVTec layout
        raise PipelineConfigError(f"dataset.source: {exc}. Fix: point dataset.source at an MVTec-layout "
                                  "folder (train/good, test/<class>) or set dataset.kind") from exc
    shape = _shape_text(target.roi_shape)
    return [
        Candidate(path=it.path, label=it.label, defect_class=it.defect_class, source_split=it.split,
                  mask_path=it.mask_path, mm_per_px=target.mm_per_px, roi_shape=shape)
        for it in items
    ]


def _server_candidates(root: Path, target: Target, cfg: PipelineConfig) -> list[Candidate]:
    """The GUI's ``ok``/``ng`` samples of one model; ``root`` was checked by ``check_source``."""
    from bdi.refs import DatasetRef
    from bdi.storage.datasets import LABELS, DatasetStore

    store = DatasetStore(root)
    ref = DatasetRef(recipe_id=target.ref.recipe_id, role_id=target.ref.role_id, roi_id=target.ref.roi_id)
    out: list[Candidate] = []
    for label in LABELS:
        for sample in store.samples(ref, label):
            meta = sample.meta
            mm = meta.get("mm_per_px", target.mm_per_px)
            try:
                mm = float(mm)
            except (TypeError, ValueError):
                mm = float("nan")
            shape = meta.get("shape_json") if meta.get("shape_json") not in (None, "") else target.roi_shape
            out.append(Candidate(path=sample.path, label=label, defect_class="good" if label == "ok" else "ng",
                                 source_split="pool", mask_path=None, mm_per_px=mm,
                                 roi_shape=_shape_text(shape)))
    return out


# --------------------------------------------------------------------------------------------- validation


def validate_candidate(cand: Candidate, *, cfg: PipelineConfig) -> tuple[SampleFacts | None, str | None]:
    """``(facts, None)`` for a usable file (``bdi.data.checks.check_sample``) or ``(None, reason)``."""
    from bdi.data.checks import SampleLimits, check_sample

    ds = cfg.dataset
    limits = SampleLimits(max_pixels=ds.max_pixels, channels=tuple(ds.channels), min_size=ds.min_size)
    try:
        return check_sample(cand.path, mask_path=cand.mask_path, mm_per_px=cand.mm_per_px, limits=limits), None
    except BDIError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------------------------- splits


def assign_splits(kept: Sequence[tuple[Candidate, SampleFacts]], *, cfg: PipelineConfig) -> list[str]:
    """The split of every kept file (``bdi.data.splits.assign_splits``, the one home of the rule), aligned with
    ``kept``."""
    items = [
        SplitItem(source_split=cand.source_split, label=cand.label, defect_class=cand.defect_class,
                  sha256=facts.sha256, path=str(cand.path))
        for cand, facts in kept
    ]
    splits = cfg.dataset.splits
    return assign_splits_rule(items, calib_fraction=splits.calib_fraction, train_fraction=splits.train_fraction)


# --------------------------------------------------------------------------------------------- stage


def run_ingest(cfg: PipelineConfig, *, root: Path, show_progress: bool = False) -> IngestResult:
    """List, validate and split every model's files into manifest rows."""
    from tqdm import tqdm

    resolved = resolve_source(cfg, root=root)
    source = resolved.folder
    result = IngestResult(rows=[], rejected=[], source=resolved.report(root))
    for target in targets(cfg):
        listing = _mvtec_candidates if resolved.layout == "mvtec" else _server_candidates
        candidates = listing(source, target, cfg)
        result.n_found += len(candidates)
        kept: list[tuple[Candidate, SampleFacts]] = []
        seen: dict[str, Path] = {}
        bar: Iterable[Candidate] = tqdm(candidates, desc=f"ingest {target.key}", unit="img",
                                        disable=not show_progress)
        for cand in bar:
            facts, reason = validate_candidate(cand, cfg=cfg)
            if facts is not None and facts.sha256 in seen:
                duplicate_of = rel_path(seen[facts.sha256], root)
                facts, reason = None, f"duplicate: same bytes as {duplicate_of}"
            if facts is None:
                result.rejected.append({"file": rel_path(cand.path, root), "role": target.ref.role_id,
                                        "roi": target.ref.roi_id, "reason": str(reason)})
                log.warning("rejected %s: %s", cand.path, reason)
                continue
            seen[facts.sha256] = cand.path
            if cand.label == "ng" and cand.mask_path is None and resolved.layout == "mvtec":
                result.warnings.append(f"{rel_path(cand.path, root)}: no ground-truth mask (left out of pixel metrics)")
            kept.append((cand, facts))
        splits = assign_splits(kept, cfg=cfg)
        if "train" not in splits:
            raise PipelineDataError(
                f"no usable training (OK) image for {target.key} in {source}: check dataset.source, "
                f"dataset.rois and the rejections ({len(result.rejected)} so far)"
            )
        for (cand, facts), split in zip(kept, splits, strict=True):
            result.rows.append(ManifestRow(
                file=rel_path(cand.path, root), recipe=target.ref.recipe_id, role=target.ref.role_id,
                roi=target.ref.roi_id, model_key=target.ref.model_key, split=split,
                label=cand.label, defect_class=cand.defect_class,
                mask=rel_path(cand.mask_path, root) if cand.mask_path is not None else "",
                mm_per_px=cand.mm_per_px, roi_shape=cand.roi_shape, width=facts.width,
                height=facts.height, sha256=facts.sha256,
            ))
    order = {name: i for i, name in enumerate(SPLITS)}
    result.rows.sort(key=lambda r: (r.recipe, r.role, r.roi, order[r.split], r.defect_class, r.file))
    return result


def write_outputs(result: IngestResult, *, cfg: PipelineConfig, root: Path) -> tuple[Path, Path]:
    """Write the manifest CSV and ``ingest_report.json``."""
    manifest = write_manifest(resolve_path(root, cfg.paths.manifest), result.rows)
    report = write_json(resolve_path(root, cfg.paths.ingest_report), result.report(cfg))
    return manifest, report


def execute(ctx: StageContext) -> IngestResult:
    check_source(ctx.cfg, root=ctx.project_root)  # a missing folder fails before an MLflow run is opened
    with stage_run(ctx) as run:
        result = run_ingest(ctx.cfg, root=ctx.project_root, show_progress=True)
        manifest, report = write_outputs(result, cfg=ctx.cfg, root=ctx.project_root)
        splits = Counter(r.split for r in result.rows)
        run.log_metrics({"n_found": result.n_found, "n_kept": len(result.rows), "n_rejected": len(result.rejected),
                         **{f"n_{k}": v for k, v in splits.items()}})
        run.log_artifact(manifest, "ingest")
        run.log_artifact(report, "ingest")
        log_dataset(run, ctx, split=None, context="ingest")
    for item in result.rejected:
        log.info("rejected %s: %s", item["file"], item["reason"])
    log.info("ingest: kept %d of %d files (%s), rejected %d -> %s", len(result.rows), result.n_found,
             dict(splits), len(result.rejected), ctx.cfg.paths.ingest_report)
    return result


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute_stage(cfg, stage=STAGE, execute=execute)


if __name__ == "__main__":
    run_cli(main)
