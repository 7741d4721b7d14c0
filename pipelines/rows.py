"""The data side of the stages: the (recipe, role, roi) targets of the dataset config and their manifest rows'
images, masks, scores and metrics (``bdi`` calls). ``pipelines.stage`` re-exports these names for the stages."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bdi.errors import BDIError
from bdi.refs import ModelRef
from pipelines.config import PipelineConfig, PipelineConfigError
from pipelines.manifest import ManifestRow, PipelineDataError, model_rows

if TYPE_CHECKING:
    from bdi.data.metrics import EvaluationReport
    from bdi.service import InspectionService
    from pipelines.stage import StageContext


def resolve_path(root: Path, value: str | Path) -> Path:
    """``value`` when absolute, else relative to the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path



# --------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One model the pipeline builds: a ModelStore ref plus its data settings."""

    ref: ModelRef
    mm_per_px: float
    roi_shape: dict[str, Any] | None
    subdir: str | None

    @property
    def key(self) -> str:
        """``<recipe>/<role>/<roi>``: the id in metrics.json, scores.csv and registration.json."""
        return f"{self.ref.recipe_id}/{self.ref.role_id}/{self.ref.roi_id}"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the key, for plot file names."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.key.replace("/", "__")).strip("-") or "model"


def targets(cfg: PipelineConfig) -> list[Target]:
    """The (recipe, role, roi) models of the dataset config, in config order."""
    out: list[Target] = []
    for i, roi in enumerate(cfg.dataset.rois):
        try:
            ref = ModelRef.create(recipe_id=cfg.dataset.recipe, role_id=roi.role, roi_id=roi.roi,
                                  model_key=roi.model_key)
        except BDIError as exc:
            raise PipelineConfigError(f"dataset.recipe / dataset.rois[{i}]: {exc}") from exc
        mm = roi.mm_per_px if roi.mm_per_px is not None else cfg.dataset.mm_per_px
        shape = roi.roi_shape if roi.roi_shape is not None else cfg.dataset.roi_shape
        out.append(Target(ref=ref, mm_per_px=float(mm), roi_shape=dict(shape) if shape else None,
                          subdir=roi.subdir))
    return out


# --------------------------------------------------------------------------------------------- data


def rows_for(manifest: Sequence[ManifestRow], target: Target, split: str) -> list[ManifestRow]:
    """Manifest rows of one model and split, in manifest order."""
    return model_rows(manifest, target.ref, split=split)


def recipe_mm_per_px(manifest: Sequence[ManifestRow], target: Target) -> float:
    """The scale of a model's images: the one ``mm_per_px`` of its manifest rows (server samples carry
    their own), else the dataset config's. Several values are an error: a recipe has one scale
    (docs/contract.md "Scale lock")."""
    values = sorted({row.mm_per_px for row in model_rows(manifest, target.ref)})
    if len(values) > 1:
        raise PipelineDataError(f"the images of {target.key} have several mm_per_px values {values}: "
                                "a recipe has one scale; fix the sample metas or dataset.mm_per_px")
    return values[0] if values else target.mm_per_px


def load_image(root: Path, row: ManifestRow) -> np.ndarray:
    """The row's image decoded by ``bdi.patchcore.imaging`` (BGR uint8)."""
    from bdi.patchcore.imaging import decode_image

    path = resolve_path(root, row.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineDataError(f"cannot read {path} listed in the manifest: {exc}") from exc
    return decode_image(data, name=row.file)


def roi_shape(row: ManifestRow) -> dict[str, Any] | None:
    """The row's ROI shape (its shape JSON parsed; None for the full image)."""
    from bdi.patchcore.imaging import parse_shape

    return parse_shape(row.roi_shape or None)


def roi_mask(row: ManifestRow, *, width: int, height: int) -> np.ndarray:
    """The row's ROI mask (``bdi.patchcore.imaging.build_roi_mask`` of its shape; full image when empty)."""
    from bdi.patchcore.imaging import build_roi_mask

    return build_roi_mask(roi_shape(row), width=width, height=height)


def load_mask(root: Path, row: ManifestRow, *, threshold: int) -> np.ndarray | None:
    """The row's ground-truth mask binarised (``bdi.data.metrics.binarize_mask``); None for a row without one."""
    from bdi.data.metrics import binarize_mask
    from bdi.patchcore.imaging import decode_mask

    if not row.mask:
        return None
    try:
        mask = decode_mask(resolve_path(root, row.mask).read_bytes(), name=row.mask)
    except BDIError as exc:
        raise PipelineDataError(f"mask {row.mask} cannot be decoded: run the ingest stage again") from exc
    return binarize_mask(mask, threshold=threshold)


def evaluate_rows(
    ctx: StageContext, *, rows: Sequence[ManifestRow], results: Sequence[Any], threshold: float
) -> EvaluationReport:
    """``bdi.data.metrics.evaluate_scores`` of scored manifest rows (``score_rows``): their labels, scores, defect
    classes, anomaly maps and ground-truth masks, at ``threshold``. The evaluate stage reports it on the
    ``eval`` split; the calibrate stage takes its selection metrics from it on the ``calib`` split."""
    from bdi.data.metrics import evaluate_scores

    cfg = ctx.cfg
    return evaluate_scores(
        labels=[1 if row.label == "ng" else 0 for row in rows], scores=[float(r.score) for r in results],
        threshold=threshold, defect_classes=[row.defect_class for row in rows],
        maps=[r.anomaly_map for r in results],
        masks=[load_mask(ctx.project_root, row, threshold=cfg.dataset.mask_threshold) for row in rows],
        fpr_limit=cfg.evaluation.aupro_fpr_limit,
    )


def score_rows(
    service: Any,
    *,
    target: Target,
    rows: Sequence[ManifestRow],
    root: Path,
    scoring: Any,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[list[np.ndarray], list[Any]]:
    """Decode the rows' images and score them with ``InspectionService.score_images``."""
    images = [load_image(root, row) for row in rows]
    masks = [roi_mask(row, width=img.shape[1], height=img.shape[0]) for img, row in zip(images, rows, strict=True)]
    if not images:
        return [], []
    results = service.score_images(ref=target.ref, images=images, masks=masks, scoring=scoring,
                                   shapes=[roi_shape(row) for row in rows], progress=progress)
    return images, list(results)


def build_service(ctx: StageContext, *, models_dir: Path) -> InspectionService:
    """An ``InspectionService`` over ``models_dir`` with the config's model (one extractor per process)."""
    from bdi.service import InspectionService
    from pipelines.config import to_settings

    return InspectionService.from_settings(to_settings(ctx.cfg, models_dir=models_dir, project_root=ctx.project_root))
