"""Configuration: frozen algorithm dataclasses and the runtime ``Settings``.

Algorithm defaults live here once (docs/contract.md "Scoring"). ``Settings``
(pydantic-settings) adds runtime fields and resolves, in order of precedence:
init kwargs > ``BDI_*`` env (legacy ``BRAKEDISC_*``) > YAML file (``BDI_CONFIG``) > defaults.
Library functions receive the sub-config they need and never read ``os.environ``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bdi.backbones import BACKBONES, DINOV2_VITS14, Intensity, backbone_spec
from bdi.settings_sources import ContractEnvSource, YamlSource, env_aliases, optional, truthy

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DeviceName = Literal["auto", "cpu", "cuda"]
ReviewDecision = Literal["ng", "ok"]  # the legacy decision of a score sent to review (CalibrationConfig)
RuntimeName = Literal["auto", "torch", "onnxruntime", "openvino"]  # what runs the feature net (bdi.runtime.select)
# copies of each good image that a fit adds to the memory (bdi.patchcore.augment): none, the flips (H, V, both), the
# 90° rotations (about the image centre: an annulus ROI centred on the image turns about the disc centre) or all 8
Augmentation = Literal["none", "flips", "rot90", "dihedral"]
# what a model sees of a crop whose ROI is an annulus (bdi.patchcore.polar): the crop, or the annulus unwrapped into a
# folded strip (when its hole is at least half its radius: a friction ring or a vent band, not a hub with a small bore)
Unwrap = Literal["none", "annulus"]
# exported feature nets (bdi.runtime.export): in the weights cache dir and in registered models
EXPORTS_DIRNAME = "exports"
SECURITY_DIRNAME = ".security"
OPENCV_MAX_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"  # OpenCV's own decoder limit (Settings.opencv_env)


@dataclass(frozen=True)
class FeatureConfig:
    """How patch features are extracted. Every field changes scores and goes in the manifest.

    ``input_size``, ``blocks``, ``neighbourhood`` and ``intensity`` left at ``None`` take the backbone's defaults
    (``bdi.backbones``); :meth:`resolved` fills them in.
    """

    backbone: str = DINOV2_VITS14  # a name of bdi.backbones.BACKBONES
    weights: str = "official"  # a file path | "official" (the registry's sha256-pinned file) | "random"
    input_size: int | None = None  # letterbox square side in px, a multiple of the backbone's size_multiple
    blocks: tuple[int, ...] | None = None  # 0-based indices into timm's model.blocks, concatenated
    neighbourhood: int | None = None  # side of the local feature average (odd; 1 = none)
    # raw | standardize (each image's grey-level mean and spread set to fixed values before the net); stored with the
    # memory at fit, and a memory is always scored as it was fitted (bdi.patchcore.memory.fitted_intensity)
    intensity: Intensity | None = None
    depth: int | None = None  # None = the architecture's depth; smaller only to shrink the ViT for tests
    seed: int = 0  # seed of the random initialisation when weights == "random"
    device: DeviceName = "auto"
    # auto: fp16 on CUDA, bf16 on a CPU with native bf16 (avx512_bf16 / amx_bf16), else fp32; bf16/fp16 run only if
    # they pass the parity check (fp32 otherwise)
    precision: Precision = "auto"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        multiple = BACKBONES[self.backbone].size_multiple
        if self.input_size is not None and (self.input_size <= 0 or self.input_size % multiple):
            raise ValueError(
                f"input_size must be a positive multiple of {multiple} for {self.backbone}, got {self.input_size}"
            )
        if self.blocks is not None:
            if not self.blocks or min(self.blocks) < 0:
                raise ValueError("blocks must name at least one block, as 0-based indices")
            if self.depth is not None and max(self.blocks) >= self.depth:
                raise ValueError(f"blocks {self.blocks} do not exist in a ViT of depth {self.depth}")
        if self.intensity is not None and self.intensity not in get_args(Intensity):
            raise ValueError(f"intensity must be one of {get_args(Intensity)}, got {self.intensity!r}")
        if self.neighbourhood is not None and (self.neighbourhood < 1 or self.neighbourhood % 2 == 0):
            raise ValueError(f"neighbourhood must be an odd number >= 1, got {self.neighbourhood}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def resolved(self) -> FeatureConfig:
        """This config with every unset field taken from the backbone's registry entry."""
        spec = backbone_spec(self.backbone)
        return replace(
            self,
            input_size=spec.input_size if self.input_size is None else self.input_size,
            blocks=spec.blocks if self.blocks is None else tuple(self.blocks),
            neighbourhood=spec.neighbourhood if self.neighbourhood is None else self.neighbourhood,
            intensity=spec.intensity if self.intensity is None else self.intensity,
        )


@dataclass(frozen=True)
class MemoryConfig:
    """How the PatchCore memory bank is built and searched."""

    coreset_rate: float = 0.10  # fraction of patches kept, in (0, 1]
    seed: int = 0  # picks the first k-center and the random projection
    projection_dim: int | None = None  # greedy distances on a random projection; 0 = exact; None = the backbone's
    knn_index: str = "Flat"  # a faiss index_factory string: "Flat", "IVF256,Flat", "HNSW32"
    prefer_gpu: bool = True  # move the faiss index to a GPU when faiss-gpu and CUDA are present
    gpu_device: int = 0
    # each training image also enters the memory rotated about its centre by 360°·k/n, k = 1..n-1 (1 = no copies):
    # for round parts whose angle varies from image to image (docs/quality.md "Discs"); n× the fit's cost
    fit_rotations: int = 1
    # each good image (and each of its fit_rotations copies) also enters the memory flipped and/or turned by quarter
    # turns, exactly (bdi.patchcore.augment; `rot90` is fit_rotations=4 without interpolation, and it swaps a
    # non-square crop's width and height); stored in the memory's metadata
    augment: Augmentation = "none"
    # "annulus": a fit whose samples all carry a narrow annulus ROI shape is fitted on the annuli unwrapped into
    # strips (fit_rotations then turn the strip), and the model scores the crops it is sent that way, warping the map
    # back onto the crop; stored in the memory's metadata ("view"), which decides at scoring
    unwrap: Unwrap = "none"

    def __post_init__(self) -> None:
        if self.augment not in get_args(Augmentation):
            raise ValueError(f"augment must be one of {get_args(Augmentation)}, got {self.augment!r}")
        if self.unwrap not in get_args(Unwrap):
            raise ValueError(f"unwrap must be one of {get_args(Unwrap)}, got {self.unwrap!r}")
        if not (0.0 < self.coreset_rate <= 1.0) or math.isnan(self.coreset_rate):
            raise ValueError(f"coreset_rate must be in (0, 1], got {self.coreset_rate}")
        if isinstance(self.fit_rotations, bool) or not isinstance(self.fit_rotations, int) or self.fit_rotations < 1:
            raise ValueError(f"fit_rotations must be a whole number >= 1, got {self.fit_rotations!r}")
        if self.projection_dim is not None and self.projection_dim < 0:
            raise ValueError("projection_dim must be >= 0")

    def resolved(self, backbone: str) -> MemoryConfig:
        """This config with an unset ``projection_dim`` taken from the backbone's registry entry."""
        if self.projection_dim is not None:
            return self
        return replace(self, projection_dim=backbone_spec(backbone).projection_dim)


@dataclass(frozen=True)
class ScoringConfig:
    """Distances → heatmap → score → regions (docs/contract.md "Inference pipeline")."""

    # a whole number in [0, 100]: the image score's percentile over blurred values inside the mask, and the OK
    # percentile of the threshold rule (calib.json stores it as an int and /infer scores with it); None = the
    # backbone's (99, the contract's, for DINOv2; 100, the map's maximum, for efficientnet_lite0)
    score_percentile: int | None = None
    area_mm2_thr: float = 1.0  # regions smaller than this are dropped
    blur_sigma: float | None = None  # Gaussian blur of the upsampled distance map, in px; None = the backbone's
    # cut padding tokens before upsampling (docs/design.md "Heatmap aligned with the crop")
    remove_letterbox: bool = True
    # 0: the image score is the percentile above; k >= 1: the mean of the k largest patch scores (the blurred map
    # at the patch centres inside the mask). A fit stores it with the memory and scoring uses the stored one.
    score_top_k: int = 0
    # draw the map where a CNN's features sit in the input, measured at fit (bdi.patchcore.alignment: about 10 px
    # below and right of their cells for EfficientNet-Lite); a ViT's tokens are their patches. Stored with the memory.
    align_features: bool = True
    # sharpen the map by how much each patch differs from the rest of its own part (bdi.patchcore.inference
    # .sharpen_by_self_contrast): the weight w of map · exp(w · z), the score unchanged; 0 = off. For uniform
    # surfaces (tiles, a friction ring: 0.15); on structured ROIs it lights up the holes and slots: docs/quality.md
    self_contrast: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.score_top_k, bool) or not isinstance(self.score_top_k, int) or self.score_top_k < 0:
            raise ValueError(f"score_top_k must be a whole number >= 0, got {self.score_top_k!r}")
        if self.score_percentile is not None and (isinstance(self.score_percentile, bool)
                                                  or not isinstance(self.score_percentile, int)
                                                  or not 0 <= self.score_percentile <= 100):
            raise ValueError(f"score_percentile must be a whole number in [0, 100], got {self.score_percentile!r}")
        if self.blur_sigma is not None and self.blur_sigma < 0:
            raise ValueError("blur_sigma must be >= 0")
        if not 0.0 <= self.self_contrast <= 1.0:
            raise ValueError(f"self_contrast must be in [0, 1], got {self.self_contrast!r}")

    def resolved(self, backbone: str) -> ScoringConfig:
        """This config with an unset ``blur_sigma`` and ``score_percentile`` taken from the backbone's entry."""
        spec = backbone_spec(backbone)
        return replace(
            self,
            blur_sigma=spec.blur_sigma if self.blur_sigma is None else self.blur_sigma,
            score_percentile=spec.score_percentile if self.score_percentile is None else self.score_percentile,
        )


@dataclass(frozen=True)
class CalibrationConfig:
    """docs/contract.md "Threshold rule"; its OK percentile is ``ScoringConfig.score_percentile``."""

    ng_percentile: float = 5.0  # percentile of the NG scores
    overlap_factor: float = 1.02  # threshold = factor * p_ok when the NG and OK percentiles overlap
    # the OK / review / NG band (docs/design.md "Two thresholds: OK, review, NG"): set wherever NG samples were
    # calibrated on (/calibrate_dataset, the pipeline's calibrate stage); OK-only keeps the single threshold
    band: bool = True
    escape_budget: float = 0.0  # share of NG calibration scores allowed below threshold_low (passed unseen)
    false_reject_budget: float = 0.05  # share of OK calibration scores allowed at or above threshold_high
    review_decision: ReviewDecision = "ng"  # the legacy ``decision`` of a score in the band (fail-safe: ng)

    def __post_init__(self) -> None:
        for name in ("escape_budget", "false_reject_budget"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.review_decision not in ("ng", "ok"):
            raise ValueError(f"review_decision must be 'ng' or 'ok', got {self.review_decision!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the same model twice: the vocabulary of ``Settings.model`` and of the
    pipeline's ``model.*`` keys. Construction fills every unset backbone-dependent field from the backbone's
    registry entry, so a ``ModelConfig`` is always resolved (change the backbone by building a new one)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self) -> None:
        backbone = self.features.backbone
        object.__setattr__(self, "features", self.features.resolved())
        object.__setattr__(self, "memory", self.memory.resolved(backbone))
        object.__setattr__(self, "scoring", self.scoring.resolved(backbone))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Settings(BaseSettings):
    """Runtime settings of the server and the CLI. Build one per app; never at import time.

    ``model`` and ``calibration`` are the library's own dataclasses (the pipeline's ``model.*`` and
    ``calibration.*`` keys are the same ones); the contract's flat env names set their fields
    (:data:`bdi.settings_sources.FLAT_NAMES`). Everything else is a runtime setting of this process.
    """

    model_config = SettingsConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    # the algorithm: what a fit builds and how /infer scores (every field goes in the manifest)
    model: ModelConfig = Field(default_factory=ModelConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    # storage
    models_dir: Path = Field(Path("models"), validation_alias=env_aliases("MODELS_DIR"))
    weights_cache_dir: Path = Field(
        Path.home() / ".cache" / "bdi", validation_alias=env_aliases("WEIGHTS_CACHE_DIR")
    )
    # what runs the feature net: auto = the fastest of torch and the exported runtimes that pass parity
    runtime: RuntimeName = Field("auto", validation_alias=env_aliases("RUNTIME"))
    # intra-op threads per process; None = the CPU cores divided among `workers` (uvicorn's WEB_CONCURRENCY)
    threads: int | None = Field(None, validation_alias=env_aliases("THREADS"))
    workers: int = Field(1, validation_alias=env_aliases("WORKERS", "WEB_CONCURRENCY"))
    min_ok_samples: int = Field(10, validation_alias=env_aliases("MIN_OK_SAMPLES"))
    train_dataset_only: bool = Field(False, validation_alias=env_aliases("TRAIN_DATASET_ONLY"))
    require_cuda: bool = Field(False, validation_alias=env_aliases("REQUIRE_CUDA"))
    # DELETE /datasets/clear may follow the read fallback to another recipe's samples (the reference did; off:
    # refused with a 409, docs/design.md "Deletes stay in their recipe")
    dataset_clear_fallback: bool = Field(False, validation_alias=env_aliases("DATASET_CLEAR_FALLBACK"))

    # serving (CORS, host and port: serving.settings.ServingSettings)
    cache_max_entries: int = Field(32, validation_alias=env_aliases("CACHE_MAX_ENTRIES"))
    log_dir: Path | None = Field(None, validation_alias=env_aliases("GUI_LOG_DIR"))

    # upload limits (docs/design.md "Upload limits")
    max_upload_bytes: int = Field(32 * 1024 * 1024, validation_alias=env_aliases("MAX_UPLOAD_BYTES"))
    max_image_pixels: int = Field(40_000_000, validation_alias=env_aliases("MAX_IMAGE_PIXELS"))
    max_files_per_request: int = Field(512, validation_alias=env_aliases("MAX_FILES_PER_REQUEST"))
    # hardening (issue 16): limits that act before the bytes land, one writer per model
    max_request_bytes: int = Field(64 * 1024 * 1024, validation_alias=env_aliases("MAX_REQUEST_BYTES"))
    max_dataset_images: int = Field(1000, validation_alias=env_aliases("MAX_DATASET_IMAGES"))
    fit_lock_timeout_s: float = Field(10.0, validation_alias=env_aliases("FIT_LOCK_TIMEOUT_S"))
    orphan_tmp_age_s: float = Field(300.0, validation_alias=env_aliases("ORPHAN_TMP_AGE_S"))

    # MLflow (optional; empty tracking_uri = no tracking from the server)
    mlflow_tracking_uri: str = Field("", validation_alias=env_aliases("MLFLOW_TRACKING_URI"))
    mlflow_experiment: str = Field("bdi", validation_alias=env_aliases("MLFLOW_EXPERIMENT"))
    registry_sync_on_start: bool = Field(False, validation_alias=env_aliases("REGISTRY_SYNC_ON_START"))
    registry_alias: str = Field("champion", validation_alias=env_aliases("REGISTRY_ALIAS"))
    mlflow_timeout_s: float = Field(5.0, validation_alias=env_aliases("MLFLOW_TIMEOUT_S"))
    mlflow_queue_size: int = Field(64, validation_alias=env_aliases("MLFLOW_QUEUE_SIZE"))
    mlflow_shutdown_timeout_s: float = Field(5.0, validation_alias=env_aliases("MLFLOW_SHUTDOWN_TIMEOUT_S"))
    # with BDI_REGISTRY_SYNC_ON_START=1: sync again every this many seconds (0 = at start-up only)
    registry_sync_interval_s: float = Field(30.0, ge=0.0, validation_alias=env_aliases("REGISTRY_SYNC_INTERVAL_S"))
    # shadow mode: also sync this alias's holders and score them on live requests, logged only ("" = off)
    registry_shadow_alias: str = Field("", validation_alias=env_aliases("REGISTRY_SHADOW_ALIAS"))

    # where the API keys and the audit trail live (docs/security.md); None = <models_dir>/.security
    security_dir: Path | None = Field(None, validation_alias=env_aliases("SECURITY_DIR"))
    # monitoring (docs/monitoring.md): the inspection record of every /infer, drift per ROI
    inspections_record: bool = Field(True, validation_alias=env_aliases("INSPECTIONS_RECORD"))
    inspections_store_images: bool = Field(False, validation_alias=env_aliases("INSPECTIONS_STORE_IMAGES"))
    inspections_image_max_bytes: int = Field(
        4 * 1024 * 1024, validation_alias=env_aliases("INSPECTIONS_IMAGE_MAX_BYTES"))
    inspections_segment_max_bytes: int = Field(
        16 * 1024 * 1024, validation_alias=env_aliases("INSPECTIONS_SEGMENT_MAX_BYTES"))
    inspections_segment_max_age_s: float = Field(86400.0, validation_alias=env_aliases("INSPECTIONS_SEGMENT_MAX_AGE_S"))
    inspections_retention_days: float = Field(30.0, validation_alias=env_aliases("INSPECTIONS_RETENTION_DAYS"))
    drift_window: int = Field(200, validation_alias=env_aliases("DRIFT_WINDOW"))
    drift_min_count: int = Field(30, validation_alias=env_aliases("DRIFT_MIN_COUNT"))

    config_file: str | None = Field(None, validation_alias=AliasChoices("BDI_CONFIG"))

    @field_validator("train_dataset_only", "require_cuda", "dataset_clear_fallback", "registry_sync_on_start",
                     "inspections_record", "inspections_store_images", mode="before")
    @classmethod
    def _parse_flag(cls, value: object) -> bool:
        return truthy(value)

    @field_validator("threads", "security_dir", mode="before")
    @classmethod
    def _parse_optional(cls, value: object) -> object:
        return optional(value)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.min_ok_samples < 1:
            raise ValueError("min_ok_samples must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1 (BDI_THREADS), or empty for the CPU cores divided among workers")
        for name in ("max_upload_bytes", "max_image_pixels", "max_files_per_request", "cache_max_entries",
                     "max_request_bytes", "max_dataset_images", "mlflow_queue_size", "workers",
                     "inspections_image_max_bytes", "inspections_segment_max_bytes", "drift_window", "drift_min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("fit_lock_timeout_s", "orphan_tmp_age_s", "mlflow_timeout_s", "mlflow_shutdown_timeout_s"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
        if not self.inspections_segment_max_age_s > 0 or not math.isfinite(self.inspections_segment_max_age_s):
            raise ValueError("inspections_segment_max_age_s must be a finite number > 0")
        if not self.inspections_retention_days * 86400.0 > self.inspections_segment_max_age_s:
            raise ValueError("inspections_retention_days must be longer than inspections_segment_max_age_s "
                             "(a segment still written to is never expired)")
        if self.drift_min_count > self.drift_window:
            raise ValueError("drift_min_count must be <= drift_window")
        return self

    def opencv_env(self) -> dict[str, str]:
        """OpenCV's own decoder limit set to ``max_image_pixels``: OpenCV reads it once, when ``cv2`` is
        imported, so a launcher puts it in the environment of processes that have not imported ``cv2`` yet
        (``python -m serving``)."""
        return {OPENCV_MAX_PIXELS_ENV: str(self.max_image_pixels)}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config_file") or init_kwargs.get("BDI_CONFIG") or os.environ.get("BDI_CONFIG")
        return init_settings, ContractEnvSource(settings_cls, case_sensitive=True), YamlSource(settings_cls, path)

    def intra_op_threads(self) -> int:
        """Threads each process computes with: ``threads``, else the usable CPU cores // ``workers`` (≥ 1)."""
        if self.threads is not None:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.workers)

    def security_root(self) -> Path:
        """The folder of the key file and the audit trail: ``security_dir``, else ``<models_dir>/.security``
        (with the server's state, so ``bdi keys`` with the server's settings acts on the running server)."""
        return self.security_dir if self.security_dir is not None else self.models_dir / SECURITY_DIRNAME

    def exports_dir(self) -> Path:
        """The machine's cache of exported feature nets (``bdi.runtime.export``): ``<weights_cache_dir>/exports``."""
        return self.weights_cache_dir.expanduser() / EXPORTS_DIRNAME
