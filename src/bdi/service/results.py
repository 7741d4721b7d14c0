"""What the use cases return: the types ``serving/`` shapes its responses from (re-exported by :mod:`bdi.service`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdi.patchcore.calibration import Calibration
from bdi.patchcore.inference import InferenceResult, Region
from bdi.refs import ModelRef


@dataclass(frozen=True)
class FitResult:
    """One stored fit (``/fit_ok``, the fit_ok stage): what was encoded, what the coreset kept, where it went."""

    n_embeddings: int
    coreset_size: int
    token_shape: tuple[int, int]
    coreset_rate_requested: float
    coreset_rate_applied: float  # coreset_size / n_embeddings, in [0, 1]
    n_images: int
    memory_path: Path
    index_path: Path | None
    fingerprint: str
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class InferOutcome:
    result: InferenceResult
    threshold: float
    decision: str
    heatmap_png: bytes | None
    lineage: dict[str, Any] | None = None  # bdi.storage.lineage.lineage_view of the model that answered
    review: bool = False  # the score is in the calibration's OK / review / NG band (decision: review_decision)
    threshold_low: float | None = None  # the band's thresholds; None without a band
    threshold_high: float | None = None


@dataclass(frozen=True)
class SampleScore:
    """One dataset file scored (``infer_dataset`` item, and the scores calibration uses)."""

    label: str
    filename: str
    mm_per_px: float | None
    score: float | None
    regions: list[Region]
    error: str | None
    heatmap_png: bytes | None = None
    threshold: float | None = None  # the calibrated threshold the item was judged with (infer_dataset)
    review: bool = False  # the score is in the calibration's OK / review / NG band (as InferOutcome.review)
    threshold_low: float | None = None  # the band's thresholds; None without a band
    threshold_high: float | None = None
    image_stats: dict[str, float] | None = None  # bdi.monitoring.imagestats of the crop (the drift reference)


@dataclass(frozen=True)
class ModelState:
    """``/state``: whether ``ref`` has a memory and a calibration file, and its lineage view."""

    ref: ModelRef
    memory_fitted: bool
    calib_present: bool  # a calibration object is stored (usable or not)
    lineage: dict[str, Any] | None  # bdi.storage.lineage.lineage_view; None without a memory


@dataclass(frozen=True)
class ModelSnapshot:
    """What serves one model now: its memory's fingerprint and its threshold (None when absent)."""

    memory_fingerprint: str | None
    threshold: float | None


@dataclass(frozen=True)
class ModelManifest:
    """``/manifest``: memory presence, the calibration object as stored (old files' missing keys stay missing),
    the sample folders' listing and the lineage view."""

    ref: ModelRef
    memory: bool
    calib: dict[str, Any] | None
    datasets: dict[str, Any]  # bdi.storage.datasets.SampleFolders.listing
    lineage: dict[str, Any] | None


@dataclass(frozen=True)
class ManualCalibration:
    """A threshold an operator set (``/calibrate_manual``): the stored calibration and the threshold it
    replaced (None when there was no calibration), so a client can restore it."""

    calibration: Calibration
    previous_threshold: float | None
