"""Fitting (docs/contract.md "POST /fit_ok"): encode OK images, subsample the patches into a memory, store it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bdi.config import MemoryConfig
from bdi.errors import InsufficientSamplesError, InvalidInputError, StorageError, TokenGridMismatchError
from bdi.logging import slog
from bdi.patchcore.augment import augmented, copies
from bdi.patchcore.imaging import parse_shape, validate_mm_per_px
from bdi.patchcore.inference import NO_OFFSET, Offset, StageTimer
from bdi.patchcore.knn import FAISS_AVAILABLE
from bdi.patchcore.memory import Memory, MemoryBuilder, build_index, fitted_scoring_metadata
from bdi.patchcore.model import ProgressFn
from bdi.patchcore.polar import VIEW_CROP, FitViews
from bdi.refs import ModelRef
from bdi.service.context import ServiceContext
from bdi.service.results import FitResult
from bdi.storage.datasets import Sample
from bdi.storage.fsio import utc_now_iso
from bdi.storage.lineage import api_lineage, ensure_api_writable, hashes_digest, write_lineage

FitHook = Callable[[ModelRef, FitResult, Memory], None]


class Fitting:
    """Build and store the memory of a model (the fit the API and the fit_ok stage share)."""

    def __init__(self, ctx: ServiceContext, *, on_fit: FitHook | None = None) -> None:
        self._ctx = ctx
        self._on_fit = on_fit

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
        ctx = self._ctx
        mm_per_px = validate_mm_per_px(mm_per_px)
        if ctx.settings.train_dataset_only and not use_dataset:
            raise InvalidInputError(
                "Training only supported from dataset (use_dataset=true) in this deployment."
            )
        if not use_dataset and not images:
            raise InvalidInputError("No images provided")
        ensure_api_writable(ctx.store, ref)  # the registry's models are not overwritten (409)
        # 409 before the samples are read (the /fit_ok order); locked only when the memory is stored
        ctx.store.check_mm_per_px(ref.recipe_id, mm_per_px)
        named: Iterable[tuple[str, bytes]]
        shapes: list[dict[str, Any] | None] | None = None  # uploads carry no ROI shape
        if use_dataset:
            samples = self._ok_dataset_samples(ref)
            n_images = len(samples)
            if ctx.settings.model.memory.unwrap == "annulus":  # only then do the samples' shapes matter to a fit
                shapes = [parse_shape(s.meta.get("shape_json")) for s in samples]
            named = ((s.path.name, _read_sample(s.path)) for s in samples)
        else:
            ctx.limits.check_file_count(len(images))
            n_images = len(images)
            named = iter(images)
        image_sha256s: list[str] = []  # the lineage's data hash, gathered as the images stream by

        def decode(pairs: Iterable[tuple[str, bytes]]) -> Iterator[np.ndarray]:
            for name, data in pairs:
                image_sha256s.append(hashlib.sha256(data).hexdigest())
                yield ctx.decode(data, name=name)

        # decoded lazily, batch by batch, inside the fit: never all images at once
        tracker = ctx.progress.tracker(ref, "fit", forward=progress)  # what GET /progress reads, from any worker
        try:
            result = self.fit_images(ref=ref, mm_per_px=mm_per_px, images=decode(named), n_images=n_images,
                                     memory_fit=memory_fit, progress=tracker, shapes=shapes)
        except BaseException as exc:
            tracker.finish(error=exc)
            raise
        tracker.finish()
        write_lineage(ctx.store, ref, api_lineage(
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
        shapes: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> FitResult:
        """Fit ``ref`` on decoded BGR crops: check the recipe's ``mm_per_px`` (ScaleMismatchError when
        another one is locked), then extract, subsample, lock the scale and store (the fit the API and the
        pipeline share).

        ``images`` may be a lazy iterable (then ``n_images`` says how many it yields): they are
        encoded ``batch_size`` at a time and only the coreset's inputs are kept (memory.MemoryBuilder).
        The whole fit holds the model's fit lock (``BDI_FIT_LOCK_TIMEOUT_S``): a second fit of the same
        model, from any process, waits for it or gets :class:`FitInProgressError`.

        ``shapes[i]`` is image i's ROI shape (None: the whole crop). With ``memory.unwrap = "annulus"`` and
        annulus shapes the model is fitted on the annuli unwrapped (``bdi.patchcore.polar``).
        """
        ctx = self._ctx
        ctx.store.check_mm_per_px(ref.recipe_id, mm_per_px)  # fail fast; locked below, once the fit succeeded
        images, n_images = _counted(images, n_images)
        memory_cfg = self._memory_config(memory_fit=memory_fit, coreset_rate=coreset_rate)
        extractor = ctx.extractor
        if shapes is not None and len(shapes) != n_images:
            raise InvalidInputError(f"got {len(shapes)} ROI shapes for {n_images} images")
        views = FitViews(shapes) if memory_cfg.unwrap == "annulus" and shapes is not None else None
        n_encoded = n_images * copies(memory_cfg.augment, memory_cfg.fit_rotations)  # each image and its copies
        n_rows = n_encoded * extractor.grid[0] * extractor.grid[1]
        timer = StageTimer()
        with ctx.store.fit_lock(ref, timeout_s=ctx.settings.fit_lock_timeout_s), MemoryBuilder(
            n_rows=n_rows, dim=extractor.embed_dim, cfg=memory_cfg, device=extractor.device,
            normalize=extractor.spec.l2_normalize,
        ) as builder:
            with timer.stage("encode"):
                encoded = augmented(images, memory_cfg.augment, memory_cfg.fit_rotations, view_of=views)
                self._encode(encoded, n_images=n_encoded, into=builder, timer=timer, progress=progress)
            view = (views.kind if views is not None else None) or VIEW_CROP
            if memory_cfg.unwrap == "annulus":
                slog("fit.view", view=view, shapes_given=shapes is not None, model_key=ref.model_key)
            with timer.stage("align"):  # where the net's features sit (bdi.patchcore.alignment): once per process
                align = ctx.settings.model.scoring.align_features
                map_offset = extractor.map_offset() if align else NO_OFFSET
            with timer.stage("coreset"):
                memory = self._subsample(builder, n_images=n_images, view=view, map_offset=map_offset,
                                         progress=progress)
            with timer.stage("index"):
                index = build_index(memory, memory_cfg, use_faiss=FAISS_AVAILABLE)
            with timer.stage("save"):
                # a failed fit leaves no lock (docs/design.md "Failed requests leave nothing behind")
                ctx.store.lock_mm_per_px(ref.recipe_id, mm_per_px)
                paths = ctx.store.save_model(ref, memory, index)  # a torch (no-faiss) index is not written
        result = FitResult(
            n_embeddings=n_rows,
            coreset_size=memory.size,
            token_shape=extractor.grid,
            coreset_rate_requested=float(memory_cfg.coreset_rate),
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

    def _memory_config(self, *, memory_fit: bool, coreset_rate: float | None) -> MemoryConfig:
        """The settings' memory config at the rate of this fit: 1.0 for ``memory_fit``, else the given one."""
        memory_cfg = self._ctx.settings.model.memory
        rate = 1.0 if memory_fit else (memory_cfg.coreset_rate if coreset_rate is None else coreset_rate)
        return replace(memory_cfg, coreset_rate=rate)

    def _encode(
        self,
        images: Iterable[np.ndarray],
        *,
        n_images: int,
        into: MemoryBuilder,
        timer: StageTimer,
        progress: ProgressFn | None,
    ) -> None:
        """Extract the patch embeddings of every image batch by batch into the builder; exactly ``n_images``."""
        grid = self._ctx.extractor.grid
        done = 0
        for batch in self._ctx.extractor.iter_extract(images, clock=timer.stage):  # + letterbox, forward…
            if batch.grid != grid:
                raise TokenGridMismatchError(got=batch.grid, expected=grid)
            if done + len(batch) > n_images:
                raise InvalidInputError(f"more images than the {n_images} declared")
            into.add(batch.embeddings.reshape(-1, batch.embeddings.shape[-1]))
            done += len(batch)
            if progress:
                progress("encode", done, n_images)
        if done != n_images:
            raise InvalidInputError(f"got {done} images, {n_images} were declared")

    def _subsample(self, builder: MemoryBuilder, *, n_images: int, view: str, map_offset: Offset,
                   progress: ProgressFn | None) -> Memory:
        """The coreset of the encoded patches, with the features it was extracted with, what it saw of the crops
        (``view``: ``bdi.patchcore.polar.VIEW_CROP`` or ``VIEW_POLAR``) and where its maps are drawn
        (``map_offset``) in its metadata."""
        extractor = self._ctx.extractor
        scoring = self._ctx.settings.model.scoring
        return builder.build(
            token_shape=extractor.grid,
            n_images=n_images,
            extra_metadata={"features": extractor.describe(), "signature": extractor.signature(),
                            "scoring": fitted_scoring_metadata(scoring, map_offset=map_offset), "view": view,
                            "created_at_utc": utc_now_iso()},
            on_progress=(lambda d, t: progress("coreset", d, t)) if progress else None,
        )

    def _ok_dataset_samples(self, ref: ModelRef) -> list[Sample]:
        """The stored OK images to fit on (/fit_ok step 6), checked against the minimum and the cap."""
        samples = self._ctx.datasets.samples(ref.dataset_ref(), "ok")
        if not samples:
            raise InsufficientSamplesError("No OK dataset samples found")
        minimum = self._ctx.settings.min_ok_samples
        if len(samples) < minimum:
            raise InsufficientSamplesError(
                f"Insufficient OK samples: need at least {minimum}, found {len(samples)}"
            )
        self._ctx.limits.check_dataset_size(len(samples))
        return list(samples)


def _counted(images: Iterable[np.ndarray], n_images: int | None) -> tuple[Iterable[np.ndarray], int]:
    """The images and how many there are (a lazy iterable must say so; a sized one is counted); at least one."""
    if n_images is None:
        if not isinstance(images, Sized):
            images = list(images)
        n_images = len(images)
    if n_images < 1:
        raise InvalidInputError("No valid images")
    return images, n_images


def _read_sample(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidInputError(f"dataset sample {path.name} was deleted during the request; retry") from exc
    except OSError as exc:
        raise StorageError(f"cannot read dataset sample {path.name}: {exc}") from exc
