"""The parity check that decides whether an exported runtime may replace torch.

Golden images (:func:`golden_images`: seeded synthetic discs, good and defective, square and not, plus
a noise image far from them) go through the extractor's torch net and through the runtime; both the
features and the final scores must agree:

* features: ``max |f_runtime − f_torch| / max |f_torch| ≤ 1e-3`` (:data:`FEATURE_REL_TOL`), over every
  value of every golden image; ``1e-2`` (:data:`REDUCED_FEATURE_REL_TOL`) for a runtime computing in bf16/fp16;
* scores: a memory is built from the torch features of two golden discs, the other images are scored
  against it with the real scoring chain (1-NN, map, blur, 99th percentile), once from the torch
  features and once from the runtime's: ``|s_runtime − s_torch| / |s_torch| ≤ 1e-3`` for each
  (:data:`SCORE_REL_TOL`), whatever the precision.

The torch side is always the fp32 torch net, whatever precision the extractor is configured with.

A runtime that raises, or returns another shape or a non-finite value, fails. The same pass times one
image per forward on each side (median ms), which is what ``BDI_RUNTIME=auto`` ranks runtimes by.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bdi.config import ScoringConfig
from bdi.data.synthetic import make_disc
from bdi.patchcore.features import FeatureExtractor, ForwardRuntime
from bdi.patchcore.imaging import Letterbox, build_roi_mask
from bdi.patchcore.inference import score_crop
from bdi.patchcore.knn import FAISS_AVAILABLE, KnnIndex
from bdi.patchcore.memory import l2_normalize

FEATURE_REL_TOL = 1e-3
# bf16 keeps 8 significant bits: rounding alone moves a feature by up to 2^-9 of itself (measured here: 4e-3 of
# max|f| on both backbones), so reduced precision is held to 1e-2 on features, and to the same 1e-3 on scores.
REDUCED_FEATURE_REL_TOL = 1e-2
SCORE_REL_TOL = 1e-3
GOLDEN_SEED = 18
N_MEMORY_IMAGES = 2  # the first golden images build the memory; the others are scored


@dataclass(frozen=True)
class ParityTolerance:
    feature_rel: float = FEATURE_REL_TOL
    score_rel: float = SCORE_REL_TOL

    @classmethod
    def for_precision(cls, precision: str) -> ParityTolerance:
        """The tolerance for a runtime computing in ``precision`` (``fp32``, ``bf16``, ``fp16``)."""
        return cls() if precision == "fp32" else cls(feature_rel=REDUCED_FEATURE_REL_TOL)


def golden_images() -> list[np.ndarray]:
    """Five BGR ``uint8`` images: two good discs (the memory), then a scratched disc, a non-square crop
    of a cracked disc (letterbox padding) and seeded colour noise (far from the memory)."""
    rng = np.random.default_rng(GOLDEN_SEED)
    memory = [make_disc(size=192, rng=rng).image for _ in range(N_MEMORY_IMAGES)]
    scratch = make_disc(size=192, defect="scratch", rng=rng).image
    crack = np.ascontiguousarray(make_disc(size=240, defect="crack", rng=rng).image[40:190, 5:235])
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    return [*memory, scratch, crack, noise]


@dataclass(frozen=True)
class ParityReport:
    """The outcome of one runtime's parity check (stored in ``export.json`` and shown by ``/health``)."""

    runtime: str
    passed: bool
    feature_rel_err: float | None = None
    feature_max_abs_err: float | None = None
    feature_min_cosine: float | None = None
    score_rel_err: float | None = None
    scores_torch: tuple[float, ...] = ()
    scores_runtime: tuple[float, ...] = ()
    torch_ms: float | None = None
    runtime_ms: float | None = None
    tolerance: tuple[float, float] = (FEATURE_REL_TOL, SCORE_REL_TOL)  # (features, scores), relative
    error: str | None = None  # why it failed, in words

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["scores_torch"] = list(self.scores_torch)
        body["scores_runtime"] = list(self.scores_runtime)
        body["tolerance"] = {"feature_rel": self.tolerance[0], "score_rel": self.tolerance[1]}
        return body

    def summary(self) -> str:
        if self.error is not None and self.feature_rel_err is None:
            return f"{self.runtime}: {self.error}"
        return (f"{self.runtime}: features rel err {self.feature_rel_err:.2e}, scores rel err "
                f"{self.score_rel_err:.2e} (tolerance {self.tolerance[0]:g}/{self.tolerance[1]:g})"
                + (f": {self.error}" if self.error else ""))


@dataclass(frozen=True)
class GoldenReference:
    """The torch side of the check, computed once per extractor and shared by every runtime checked."""

    batches: tuple[np.ndarray, ...]  # one (1, 3, S, S) normalised batch per golden image
    boxes: tuple[Letterbox, ...]
    features: np.ndarray  # (n, Ht*Wt, D) torch features
    index: KnnIndex  # over the L2-normalised torch features of the memory images
    grid: tuple[int, int]
    scoring: ScoringConfig
    scores: tuple[float, ...]  # torch scores of the scored images
    torch_ms: float


def _median_forward_ms(forward: Any, batches: tuple[np.ndarray, ...]) -> tuple[np.ndarray, float]:
    forward(batches[0])  # warm-up (allocations, lazy init)
    outs, times = [], []
    for batch in batches:
        start = time.perf_counter()
        outs.append(forward(batch))
        times.append((time.perf_counter() - start) * 1e3)
    return np.concatenate(outs, axis=0), statistics.median(times)


def _scores(reference_index: KnnIndex, features: np.ndarray, *, grid: tuple[int, int],
            boxes: tuple[Letterbox, ...], scoring: ScoringConfig) -> tuple[float, ...]:
    scores = []
    for feats, box in zip(features[N_MEMORY_IMAGES:], boxes[N_MEMORY_IMAGES:], strict=True):
        mask = build_roi_mask(None, width=box.src_w, height=box.src_h)
        result = score_crop(embeddings=feats, grid=grid, letterbox=box, index=reference_index, memory_grid=grid,
                            mask=mask, cfg=scoring, threshold=None, mm_per_px=1.0)
        scores.append(float(result.score))
    return tuple(scores)


def golden_reference(extractor: FeatureExtractor) -> GoldenReference:
    """Torch fp32 features, memory, scores and forward time of the golden images on ``extractor``."""
    prepared = [extractor.prepare([image]) for image in golden_images()]
    batches = tuple(batch for batch, _ in prepared)
    boxes = tuple(box for _, (box,) in prepared)
    features, torch_ms = _median_forward_ms(lambda batch: extractor.forward_torch(batch, precision="fp32"), batches)
    rows = features[:N_MEMORY_IMAGES].reshape(-1, features.shape[-1])
    index = KnnIndex.build(l2_normalize(rows), factory="Flat", use_faiss=FAISS_AVAILABLE)
    scoring = ScoringConfig().resolved(extractor.config.backbone)
    scores = _scores(index, features, grid=extractor.grid, boxes=boxes, scoring=scoring)
    return GoldenReference(batches=batches, boxes=boxes, features=features, index=index, grid=extractor.grid,
                           scoring=scoring, scores=scores, torch_ms=torch_ms)


def check_parity(
    reference: GoldenReference, runtime: ForwardRuntime, *, tolerance: ParityTolerance | None = None
) -> ParityReport:
    """Run the golden images through ``runtime`` and compare with the torch ``reference``; the tolerance is
    the one of the runtime's ``precision`` attribute (fp32 when it has none) unless one is given."""
    tol = tolerance or ParityTolerance.for_precision(getattr(runtime, "precision", "fp32"))
    common: dict[str, Any] = {"runtime": runtime.name, "torch_ms": reference.torch_ms,
                              "tolerance": (tol.feature_rel, tol.score_rel), "scores_torch": reference.scores}
    try:
        got, runtime_ms = _median_forward_ms(runtime.run, reference.batches)
    except Exception as exc:  # noqa: BLE001 - any runtime failure means "not usable", reported in words
        return ParityReport(passed=False, error=f"the runtime failed: {type(exc).__name__}: {exc}", **common)
    want = reference.features
    if got.shape != want.shape:
        return ParityReport(passed=False, runtime_ms=runtime_ms,
                            error=f"features of shape {got.shape}, torch gives {want.shape}", **common)
    if not np.isfinite(got).all():
        return ParityReport(passed=False, runtime_ms=runtime_ms, error="non-finite features", **common)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(diff.max())
    feature_rel = max_abs / max(float(np.abs(want).max()), 1e-12)
    a = want.reshape(-1, want.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    scores = _scores(reference.index, got, grid=reference.grid, boxes=reference.boxes, scoring=reference.scoring)
    score_rel = max(abs(s - t) / max(abs(t), 1e-12) for s, t in zip(scores, reference.scores, strict=True))
    passed = feature_rel <= tol.feature_rel and score_rel <= tol.score_rel
    error = None if passed else (
        f"outside the tolerance (features {feature_rel:.2e} > {tol.feature_rel:g}"
        if feature_rel > tol.feature_rel else f"outside the tolerance (scores {score_rel:.2e} > {tol.score_rel:g}"
    ) + ")"
    return ParityReport(
        passed=passed, feature_rel_err=feature_rel, feature_max_abs_err=max_abs,
        feature_min_cosine=float(cosine.min()), score_rel_err=float(score_rel), scores_runtime=scores,
        runtime_ms=runtime_ms, error=error, **common,
    )
