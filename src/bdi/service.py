"""Use cases: the only API that ``serving/`` and ``pipelines/`` call.

Each method follows its route's processing order in docs/contract.md "Endpoints" (the first failure wins), with
the differences of docs/design.md: bad input is an ``InvalidInputError`` (never a 500), uploads are checked
before anything is stored, calibrations record the memory they belong to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bdi.config import ScoringConfig, Settings
from bdi.errors import (
    BDIError,
    InsufficientSamplesError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    TokenGridMismatchError,
    UploadLimitError,
)
from bdi.logging import slog
from bdi.patchcore.calibration import Calibration, ModelIds, choose_threshold
from bdi.patchcore.features import FeatureExtractor, cuda_available
from bdi.patchcore.imaging import build_roi_mask, decode_image, encode_png_gray, parse_shape, validate_mm_per_px
from bdi.patchcore.inference import InferenceResult, Region, StageTimer
from bdi.patchcore.knn import FAISS_AVAILABLE
from bdi.patchcore.memory import Memory, MemoryBuilder, build_index
from bdi.patchcore.model import PatchCoreModel, ProgressFn
from bdi.refs import DatasetRef, ModelRef
from bdi.runtime.select import RuntimeStatus, attach_runtime, configure_threads, current_status
from bdi.storage import model_lock
from bdi.storage.datasets import LABELS, DatasetStore, Sample, UploadItem, parse_label
from bdi.storage.fsio import remove_orphan_temp_files, utc_now_iso
from bdi.storage.lineage import (
    api_lineage,
    ensure_api_writable,
    hashes_digest,
    lineage_view,
    read_lineage,
    write_lineage,
)
from bdi.storage.loading import load_patchcore
from bdi.storage.store import ModelStore

# stored with the calibration only, never validated nor locked (docs/contract.md "POST /calibrate_ng")
CALIBRATE_NG_DEFAULT_MM_PER_PX = 0.2


# The HTTP layer shapes its responses from these types and imports them from here, never from the layers below.
__all__ = ["LABELS", "Calibration", "FitResult", "InferOutcome", "InspectionService", "Region", "SampleScore",
           "remove_orphan_files"]


def remove_orphan_files(settings: Settings) -> list[Path]:
    """Remove the temporary files that a crashed writer left under the models dir (older than
    ``settings.orphan_tmp_age_s``); the removed paths."""
    return remove_orphan_temp_files(settings.models_dir, older_than_s=settings.orphan_tmp_age_s)


@dataclass(frozen=True)
class FitResult:
    n_embeddings: int
    coreset_size: int
    token_shape: tuple[int, int]
    coreset_rate_requested: float
    coreset_rate_applied: float
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


class InspectionService:
    """Fit, calibrate and infer over one ModelStore with one feature extractor.

    Build one per process (the extractor is heavy); it holds no state that decides correctness:
    every call re-reads the store, whose caches are keyed by file identity.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        extractor: FeatureExtractor,
        store: ModelStore | None = None,
        datasets: DatasetStore | None = None,
        on_fit: Callable[[ModelRef, FitResult, Memory], None] | None = None,
        on_calibrate: Callable[[ModelRef, Calibration], None] | None = None,
        runtime: RuntimeStatus | None = None,
        on_infer: Callable[..., None] | None = None,
    ) -> None:
        self.settings = settings
        self.extractor = extractor
        # what runs the feature net (from_settings attaches BDI_RUNTIME; a given extractor keeps its own)
        self.runtime = runtime or current_status(extractor, threads=settings.intra_op_threads())
        self.store = store or ModelStore(
            settings.models_dir,
            cache_max_entries=settings.cache_max_entries,
            faiss_gpu_device=settings.model.memory.gpu_device if settings.model.memory.prefer_gpu else None,
        )
        self.datasets = datasets or DatasetStore(settings.models_dir)
        self._on_fit = on_fit
        self._on_calibrate = on_calibrate
        # called after each successful infer as on_infer(ref, image=, shape=, mm_per_px=, outcome=) (shadow mode)
        self.on_infer = on_infer

    @classmethod
    def from_settings(cls, settings: Settings, **hooks: Any) -> InspectionService:
        """Build the extractor, give the process its thread budget and attach ``BDI_RUNTIME`` (parity-checked)."""
        configure_threads(settings.intra_op_threads())
        extractor = FeatureExtractor(settings.model.features, cache_dir=settings.weights_cache_dir)
        runtime = attach_runtime(extractor, requested=settings.runtime, root=settings.exports_dir(),
                                 threads=settings.intra_op_threads())
        return cls(settings=settings, extractor=extractor, runtime=runtime, **hooks)

    # ------------------------------------------------------------------ health
    def health(self) -> dict[str, Any]:
        weights = self.extractor.weights
        return {
            "backbone": self.extractor.config.backbone,
            "device": self.extractor.device,
            "cuda_available": cuda_available(),
            "model": weights.name,
            "weights": weights.to_dict(),
            "pretrained": weights.pretrained,
            **self.runtime.health(),
        }

    # ------------------------------------------------------------------ fit
    def fit_ok(
        self,
        *,
        ref: ModelRef,
        mm_per_px: float,
        images: Sequence[tuple[str, bytes]] = (),
        use_dataset: bool = False,
        memory_fit: bool = False,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        """Build and store the memory of ``ref`` from uploaded images or the OK dataset
        (docs/contract.md "POST /fit_ok")."""
        mm_per_px = validate_mm_per_px(mm_per_px)
        if self.settings.train_dataset_only and not use_dataset:
            raise InvalidInputError(
                "Training only supported from dataset (use_dataset=true) in this deployment."
            )
        if not use_dataset and not images:
            raise InvalidInputError("No images provided")
        ensure_api_writable(self.store, ref)  # the registry's models are not overwritten (409)
        self.store.lock_mm_per_px(ref.recipe_id, mm_per_px)  # before the samples are read (the /fit_ok order)
        named: Iterable[tuple[str, bytes]]
        if use_dataset:
            paths = self._ok_dataset_paths(ref)
            n_images = len(paths)
            named = ((path.name, self._read_sample(path)) for path in paths)
        else:
            self._check_file_count(len(images))
            n_images = len(images)
            named = iter(images)
        image_sha256s: list[str] = []  # the lineage's data hash, gathered as the images stream by

        def decode(pairs: Iterable[tuple[str, bytes]]) -> Iterator[np.ndarray]:
            for name, data in pairs:
                image_sha256s.append(hashlib.sha256(data).hexdigest())
                yield self._decode(data, name=name)

        # decoded lazily, batch by batch, inside the fit: never all images at once
        result = self.fit_images(ref=ref, mm_per_px=mm_per_px, images=decode(named), n_images=n_images,
                                 memory_fit=memory_fit, progress=progress)
        write_lineage(self.store, ref, api_lineage(
            memory_fingerprint=result.fingerprint, data_hash=hashes_digest(image_sha256s),
            data_source="api:ok_dataset" if use_dataset else "api:upload",
        ))
        return result

    def fit_images(
        self,
        *,
        ref: ModelRef,
        mm_per_px: float,
        images: Iterable[np.ndarray],
        n_images: int | None = None,
        memory_fit: bool = False,
        coreset_rate: float | None = None,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        """Fit ``ref`` on decoded BGR crops: lock the recipe's ``mm_per_px`` (ScaleMismatchError when
        another one is locked), then extract, subsample and store (the fit the API and the pipeline share).

        ``images`` may be a lazy iterable (then ``n_images`` says how many it yields): they are
        encoded ``batch_size`` at a time and only the coreset's inputs are kept (memory.MemoryBuilder).
        The whole fit holds the model's fit lock (``BDI_FIT_LOCK_TIMEOUT_S``): a second fit of the same
        model, from any process, waits for it or gets :class:`FitInProgressError`.
        """
        self.store.lock_mm_per_px(ref.recipe_id, mm_per_px)
        if n_images is None:
            if not isinstance(images, Sized):
                images = list(images)
            n_images = len(images)
        if n_images < 1:
            raise InvalidInputError("No valid images")
        timer = StageTimer()
        memory_cfg = self.settings.model.memory
        rate = 1.0 if memory_fit else (memory_cfg.coreset_rate if coreset_rate is None else coreset_rate)
        memory_cfg = replace(memory_cfg, coreset_rate=rate)
        grid = self.extractor.grid
        n_rows = n_images * grid[0] * grid[1]
        with self.store.fit_lock(ref, timeout_s=self.settings.fit_lock_timeout_s), MemoryBuilder(
            n_rows=n_rows, dim=self.extractor.embed_dim, cfg=memory_cfg, device=self.extractor.device,
            normalize=self.extractor.spec.l2_normalize,
        ) as builder:
            with timer.stage("encode"):
                done = 0
                for batch in self.extractor.iter_extract(images, clock=timer.stage):  # + letterbox, forward…
                    if batch.grid != grid:
                        raise TokenGridMismatchError(got=batch.grid, expected=grid)
                    if done + len(batch) > n_images:
                        raise InvalidInputError(f"more images than the {n_images} declared")
                    builder.add(batch.embeddings.reshape(-1, batch.embeddings.shape[-1]))
                    done += len(batch)
                    if progress:
                        progress("encode", done, n_images)
            if done != n_images:
                raise InvalidInputError(f"got {done} images, {n_images} were declared")
            with timer.stage("coreset"):
                memory = builder.build(
                    token_shape=grid,
                    n_images=n_images,
                    extra_metadata={"features": self.extractor.describe(), "signature": self.extractor.signature(),
                                    "created_at_utc": utc_now_iso()},
                    on_progress=(lambda d, t: progress("coreset", d, t)) if progress else None,
                )
            with timer.stage("index"):
                index = build_index(memory, memory_cfg, use_faiss=FAISS_AVAILABLE)
            with timer.stage("save"):
                paths = self.store.save_model(ref, memory, index)  # a torch (no-faiss) index is not written
        result = FitResult(
            n_embeddings=n_rows,
            coreset_size=memory.size,
            token_shape=grid,
            coreset_rate_requested=float(rate),
            coreset_rate_applied=memory.size / n_rows,
            n_images=n_images,
            memory_path=paths.memory,
            index_path=paths.index if index.backend != "torch" else None,
            fingerprint=memory.fingerprint,
            timings_ms=dict(timer.timings_ms),
        )
        if self._on_fit is not None:
            self._on_fit(ref, result, memory)
        return result

    def _ok_dataset_paths(self, ref: ModelRef) -> list[Path]:
        """The stored OK images to fit on (/fit_ok step 6), checked against the minimum and the cap."""
        samples = self.datasets.samples(self._dataset_ref(ref), "ok")
        if not samples:
            raise InsufficientSamplesError("No OK dataset samples found")
        minimum = self.settings.min_ok_samples
        if len(samples) < minimum:
            raise InsufficientSamplesError(
                f"Insufficient OK samples: need at least {minimum}, found {len(samples)}"
            )
        self._check_dataset_size(len(samples))
        return [s.path for s in samples]

    @staticmethod
    def _read_sample(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise InvalidInputError(
                f"dataset sample {path.name} was deleted during the request; retry"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot read dataset sample {path.name}: {exc}") from exc

    # ------------------------------------------------------------------ calibrate
    def calibrate_from_scores(
        self,
        *,
        ref: ModelRef,
        ok_scores: Iterable[Any],
        ng_scores: Iterable[Any] | None,
        mm_per_px: float | None = None,
        score_percentile: float | None = None,
        area_mm2_thr: float | None = None,
    ) -> Calibration:
        """/calibrate_ng: threshold from client scores; returns the stored calibration."""
        ensure_api_writable(self.store, ref)
        percentile, area = self._percentile_and_area(score_percentile, area_mm2_thr)
        choice = choose_threshold(
            ok_scores, ng_scores, score_percentile=percentile, cfg=self.settings.calibration
        )
        memory = self._memory_or_none(ref)
        calib = Calibration.from_choice(
            choice, area_mm2_thr=area, memory_fingerprint=memory.fingerprint if memory is not None else None,
            created_at_utc=utc_now_iso(), statistics=True,
            mm_per_px=float(CALIBRATE_NG_DEFAULT_MM_PER_PX if mm_per_px is None else mm_per_px),
        )
        self._save_calibration(ref, calib)
        return calib

    def calibrate_dataset(
        self,
        *,
        ref: ModelRef,
        score_percentile: float | None = None,
        area_mm2_thr: float | None = None,
        default_mm_per_px: float | None = None,
        require_ng: bool = True,
        progress: ProgressFn | None = None,
    ) -> Calibration:
        """/calibrate_dataset: score the stored OK/NG samples and write a new calibration."""
        ensure_api_writable(self.store, ref)
        percentile, area = self._percentile_and_area(score_percentile, area_mm2_thr)
        model = self.model(ref, endpoint="/calibrate_dataset", calibrated=False,
                           scoring=replace(self.settings.model.scoring, score_percentile=percentile, area_mm2_thr=area))
        scores: dict[str, list[float]] = {"ok": [], "ng": []}
        for label, samples in self._capped_samples(ref, LABELS).items():
            for item in self._score_samples(
                model, label=label, samples=samples, default_mm_per_px=default_mm_per_px, include_heatmap=False,
                progress=progress,
            ):
                if item.score is not None:
                    scores[label].append(item.score)
        if not scores["ok"]:
            raise InsufficientSamplesError("No valid OK samples for calibration.")
        if require_ng and not scores["ng"]:
            raise InsufficientSamplesError("No NG samples available for calibration.")
        choice = choose_threshold(
            scores["ok"], scores["ng"], score_percentile=percentile, cfg=self.settings.calibration
        )
        calib = Calibration.from_choice(
            choice, area_mm2_thr=area, memory_fingerprint=model.memory.fingerprint, created_at_utc=utc_now_iso(),
            ids=ModelIds(recipe_id=ref.recipe_id, role_id=ref.role_id, roi_id=ref.roi_id, model_key=ref.model_key),
        )
        self._save_calibration(ref, calib)
        return calib

    def _percentile_and_area(
        self, score_percentile: float | None, area_mm2_thr: float | None
    ) -> tuple[int, float]:
        """The calibration's ``score_percentile`` (stored as an int) and ``area_mm2_thr``; None = settings."""
        default = self.settings.model.scoring.score_percentile
        assert default is not None  # Settings.model is resolved
        percentile = int(default if score_percentile is None else score_percentile)
        area = float(self.settings.model.scoring.area_mm2_thr if area_mm2_thr is None else area_mm2_thr)
        return percentile, area

    def _save_calibration(self, ref: ModelRef, calib: Calibration) -> None:
        self.store.save_calibration(ref, calib.to_dict())
        if self._on_calibrate is not None:
            self._on_calibrate(ref, calib)

    # ------------------------------------------------------------------ infer
    def infer(
        self,
        *,
        ref: ModelRef,
        mm_per_px: float,
        image: bytes,
        shape: str | Mapping[str, Any] | None = None,
        include_heatmap: bool | None = None,
    ) -> InferOutcome:
        """/infer (docs/contract.md "POST /infer"): score one crop and decide ok/ng with the calibrated threshold."""
        timer = StageTimer()
        mm_per_px = validate_mm_per_px(mm_per_px)
        self.store.lock_mm_per_px(ref.recipe_id, mm_per_px)
        with timer.stage("decode"):
            crop = self._decode(image, name="image")
        with model_lock.reading(self.store, ref):  # memory, index, calibration and lineage of one version
            model = self.model(ref, endpoint="/infer", require_index=True)
            lineage = read_lineage(self.store, ref)
        assert model.calibration is not None  # calibrated=True
        threshold = model.calibration.threshold
        roi_shape = parse_shape(shape)
        with timer.stage("mask"):
            mask = build_roi_mask(roi_shape, width=crop.shape[1], height=crop.shape[0])
        (result,) = model.score([crop], [mask], mm_per_px=[mm_per_px], timer=timer)
        decision = model.decide(result.score)
        want_heatmap = include_heatmap if include_heatmap is not None else decision == "ng"
        heatmap_png = None
        if want_heatmap:
            with timer.stage("png"):
                heatmap_png = encode_png_gray(result.heatmap_u8())
        result = replace(result, timings_ms=dict(timer.timings_ms))
        slog("infer.response", score=result.score, threshold=threshold, decision=decision,
             timings_ms=result.timings_ms, model_key=ref.model_key)
        outcome = InferOutcome(result=result, threshold=threshold, decision=decision, heatmap_png=heatmap_png,
                               lineage=lineage_view(memory=model.memory, calib=model.calibration.to_dict(),
                                                    lineage=lineage))
        if self.on_infer is not None:
            self.on_infer(ref, image=image, shape=shape, mm_per_px=mm_per_px, outcome=outcome)
        return outcome

    def infer_dataset(
        self,
        *,
        ref: ModelRef,
        labels: Sequence[str] = LABELS,
        include_heatmap: bool = False,
        default_mm_per_px: float | None = None,
        progress: ProgressFn | None = None,
    ) -> list[SampleScore]:
        """/infer_dataset (docs/contract.md "POST /infer_dataset"): score every stored sample of the given labels."""
        clean_labels = [parse_label(label) for label in labels]
        with model_lock.reading(self.store, ref):
            model = self.model(ref, endpoint="/infer_dataset")
        items: list[SampleScore] = []
        for label, samples in self._capped_samples(ref, clean_labels).items():
            items.extend(
                self._score_samples(
                    model, label=label, samples=samples, default_mm_per_px=default_mm_per_px,
                    include_heatmap=include_heatmap, progress=progress,
                )
            )
        return items

    def score_images(
        self,
        *,
        ref: ModelRef,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
        scoring: ScoringConfig | None = None,
        progress: ProgressFn | None = None,
    ) -> list[InferenceResult]:
        """Score decoded crops (batched extraction) with no threshold: for calibration/evaluation.
        ``scoring`` defaults to the settings'; ``masks[i]`` None means the whole crop."""
        model = self.model(ref, endpoint="score_images", calibrated=False, scoring=scoring)
        return list(model.score(images, masks, progress=progress))

    def model(
        self,
        ref: ModelRef,
        *,
        endpoint: str = "score",
        calibrated: bool = True,
        require_index: bool = False,
        scoring: ScoringConfig | None = None,
    ) -> PatchCoreModel:
        """The stored model ``ref`` scoring with this service's extractor (:func:`bdi.storage.loading.load_patchcore`):
        ``calibrated`` with the calibration that applies to it, else with ``scoring`` (default: the settings')."""
        return load_patchcore(
            self.store, ref, extractor=self.extractor, scoring=scoring or self.settings.model.scoring,
            memory_cfg=self.settings.model.memory, endpoint=endpoint, require_index=require_index,
            calibrated=calibrated,
        )

    def _capped_samples(self, ref: ModelRef, labels: Iterable[str]) -> dict[str, list[Sample]]:
        """The stored samples of each label (a label once), refused as a whole when there are more than
        ``BDI_MAX_DATASET_IMAGES``: dataset-driven work is bounded before any image is read."""
        listed = {label: self.datasets.samples(self._dataset_ref(ref), label) for label in dict.fromkeys(labels)}
        self._check_dataset_size(sum(len(samples) for samples in listed.values()))
        return listed

    def _check_dataset_size(self, n_images: int) -> None:
        limit = self.settings.max_dataset_images
        if n_images > limit:
            raise UploadLimitError(
                f"{n_images} dataset images exceed the limit of {limit} per request (BDI_MAX_DATASET_IMAGES)"
            )

    def _score_samples(
        self,
        model: PatchCoreModel,
        *,
        label: str,
        samples: Sequence[Sample],
        default_mm_per_px: float | None,
        include_heatmap: bool,
        progress: ProgressFn | None,
    ) -> list[SampleScore]:
        """Score every stored sample of one label; a sample that fails gets ``error`` set, the rest go on.

        Samples are validated first (scale, image, shape), then the valid ones are extracted in batches.
        """
        threshold = model.threshold
        items: list[SampleScore | None] = [None] * len(samples)
        valid: list[tuple[int, np.ndarray, np.ndarray, float]] = []  # (position, crop, mask, mm_per_px)
        for i, sample in enumerate(samples):
            mm = sample.meta.get("mm_per_px", default_mm_per_px)
            try:
                if mm is None:
                    raise InvalidInputError("no mm_per_px in the sample meta and no default_mm_per_px")
                mm = validate_mm_per_px(mm)
                crop = self._decode(sample.path.read_bytes(), name=sample.path.name)
                mask = build_roi_mask(parse_shape(sample.meta.get("shape_json")),
                                      width=crop.shape[1], height=crop.shape[0])
                valid.append((i, crop, mask, mm))
            except (BDIError, OSError) as exc:
                items[i] = SampleScore(
                    label=label, filename=sample.path.name, mm_per_px=mm if isinstance(mm, float) else None,
                    score=None, regions=[], error=str(exc), threshold=threshold,
                )
        results = model.score([v[1] for v in valid], [v[2] for v in valid], mm_per_px=[v[3] for v in valid],
                              progress=progress, progress_stage=f"score_{label}")
        for (i, _, _, mm), result in zip(valid, results, strict=True):
            items[i] = SampleScore(
                label=label, filename=samples[i].path.name, mm_per_px=mm, score=result.score,
                regions=result.regions, error=None,
                heatmap_png=encode_png_gray(result.heatmap_u8()) if include_heatmap else None,
                threshold=threshold,
            )
        return [item for item in items if item is not None]

    # ------------------------------------------------------------------ state
    def state(self, ref: ModelRef) -> dict[str, Any]:
        memory, calib, lineage = self._model_snapshot(ref)
        return {
            "memory_fitted": memory is not None,
            "calib_present": calib is not None,
            "lineage": lineage,
        }

    def manifest(self, ref: ModelRef) -> dict[str, Any]:
        memory, calib, lineage = self._model_snapshot(ref)
        return {
            "memory": memory is not None,
            "calib": calib,
            "datasets": self.datasets.listing(self._dataset_ref(ref)),
            "lineage": lineage,
        }

    def _model_snapshot(self, ref: ModelRef) -> tuple[Memory | None, dict[str, Any] | None, dict[str, Any] | None]:
        """Memory, calibration and the lineage view of one model, read together (``bdi.storage.model_lock``)."""
        with model_lock.reading(self.store, ref):
            memory = self._memory_or_none(ref)
            calib = self.store.load_calibration(ref)
            sidecar = read_lineage(self.store, ref)
        return memory, calib, lineage_view(memory=memory, calib=calib, lineage=sidecar)

    # ------------------------------------------------------------------ datasets
    def dataset_listing(self, ref: DatasetRef) -> dict[str, Any]:
        """``{"role_id", "roi_id", "classes"}`` of the resolved dataset (GET /datasets/list)."""
        return self.datasets.listing(ref)

    def dataset_file(self, *, ref: DatasetRef, label: str, filename: str) -> tuple[str, bytes]:
        """``(stored name, bytes)`` of one sample (GET /datasets/file); NotFoundError when absent."""
        path = self.datasets.file_path(ref, label, filename)
        try:
            return path.name, path.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFoundError("file not found") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path.name}: {exc}") from exc

    def dataset_meta(self, *, ref: DatasetRef, label: str, filename: str) -> dict[str, Any]:
        """The sidecar of one sample (GET /datasets/meta); NotFoundError when absent."""
        return self.datasets.read_meta(ref, label, filename)

    def delete_sample(self, *, ref: DatasetRef, label: str, filename: str) -> bool:
        """Remove one sample and its sidecar (DELETE /datasets/file); True when the image existed."""
        return self.datasets.delete(ref, label, filename)

    def clear_samples(self, *, ref: DatasetRef, label: str) -> int:
        """Remove every file of one label (DELETE /datasets/clear); the number of files removed."""
        return self.datasets.clear(ref, label)

    def upload_samples(
        self,
        *,
        ref: DatasetRef,
        label: str,
        files: Sequence[tuple[str | None, bytes]],
        metas: Sequence[str] | None = None,
    ) -> list[str]:
        """Validate every file and meta, lock mm_per_px, then store all files or none (the upload routes)."""
        label = parse_label(label)
        if not files:
            raise InvalidInputError("images: at least one file is required")
        self._check_file_count(len(files))
        metas = list(metas or [])
        if metas and len(metas) != len(files):
            raise InvalidInputError("metas length must match images length")
        parsed = [self._parse_meta(text, index=i) for i, text in enumerate(metas)] or [{} for _ in files]
        for (name, data), meta in zip(files, parsed, strict=True):
            self._decode(data, name=name or "image")
            parse_shape(meta.get("shape_json"))  # None/"" mean the full image
        for meta in parsed:
            if "mm_per_px" in meta:
                self.store.lock_mm_per_px(ref.recipe_id, validate_mm_per_px(meta["mm_per_px"]))
        items = [UploadItem(data=data, client_filename=name, meta=meta)
                 for (name, data), meta in zip(files, parsed, strict=True)]
        return self.datasets.save(ref, label, items)

    @staticmethod
    def _parse_meta(text: str, *, index: int) -> dict[str, Any]:
        if text is None or str(text).strip() == "":
            return {}
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InvalidInputError(f"metas[{index}] is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):  # null included: any non-object JSON is bad input
            raise InvalidInputError(f"metas[{index}] must be a JSON object, got {type(value).__name__}")
        return value

    # ------------------------------------------------------------------ helpers
    def _decode(self, data: bytes, *, name: str) -> np.ndarray:
        if len(data) > self.settings.max_upload_bytes:
            raise UploadLimitError(
                f"{name}: {len(data)} bytes exceeds the limit of {self.settings.max_upload_bytes} "
                "bytes (BDI_MAX_UPLOAD_BYTES)"
            )
        return decode_image(data, max_pixels=self.settings.max_image_pixels, name=name)

    def _check_file_count(self, n_files: int) -> None:
        if n_files > self.settings.max_files_per_request:
            raise UploadLimitError(
                f"{n_files} files exceed the limit of {self.settings.max_files_per_request} per request "
                "(BDI_MAX_FILES_PER_REQUEST)"
            )

    def _memory_or_none(self, ref: ModelRef) -> Memory | None:
        """The memory, or None when absent or unreadable (a corrupt file reads as "not fitted",
        so the GUI's refit repairs it instead of seeing a 500)."""
        try:
            return self.store.load_memory(ref)
        except StorageError as exc:
            slog("storage.memory_unreadable", error=str(exc), model_key=ref.model_key)
            return None

    @staticmethod
    def _dataset_ref(ref: ModelRef) -> DatasetRef:
        return DatasetRef(recipe_id=ref.recipe_id, role_id=ref.role_id, roi_id=ref.roi_id)

