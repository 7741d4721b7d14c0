"""Greedy k-center coreset selection (PatchCore), on arrays, with an explicit seed.

Memory-lean: distances are updated one centre at a time in torch (no N×N matrix), optionally on
a seeded random projection of the rows (``projection_dim``), as in patchcore-inspection's
approximate greedy sampler but reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bdi.errors import InvalidInputError


def coreset_size(n_rows: int, rate: float) -> int:
    """m = max(1, ceil(N·rate)) capped at N (docs/contract.md "Memory and coreset")."""
    if n_rows < 1:
        raise InvalidInputError("No valid images: cannot build a memory from zero embeddings")
    if not (0.0 < rate <= 1.0):
        raise InvalidInputError(f"coreset rate must be in (0, 1], got {rate}")
    return min(n_rows, max(1, math.ceil(n_rows * rate)))


def greedy_k_center(
    features: np.ndarray,
    *,
    size: int,
    seed: int = 0,
    projection_dim: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Select ``size`` row indices by greedy farthest-point (k-center) sampling.

    Args:
        features: (N, D) float32 rows.
        size: number of centres m, 1 <= m <= N. m == N returns ``arange(N)`` (original order).
        seed: picks the first centre (``np.random.default_rng(seed)``) and the projection.
        projection_dim: when 0 < projection_dim < D, distances are computed on a Gaussian random
            projection to that many dimensions (Johnson–Lindenstrauss), which is much faster.
        on_progress: called as ``on_progress(done, size)`` every few hundred centres.

    Returns:
        (m,) int64 indices, unique, in selection order.
    """
    if features.ndim != 2:
        raise InvalidInputError(f"features must be 2-D (N, D), got shape {features.shape}")
    n_rows, dim = features.shape
    if not 1 <= size <= n_rows:
        raise InvalidInputError(f"coreset size must be in [1, {n_rows}], got {size}")
    if size == n_rows:
        return np.arange(n_rows, dtype=np.int64)

    plan = GreedyPlan.draw(n_rows=n_rows, dim=dim, seed=seed, projection_dim=projection_dim)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    if plan.projection is not None:
        x = x @ torch.from_numpy(plan.projection).to(device)
    return greedy_select(x, size=size, first=plan.first, on_progress=on_progress)


@dataclass(frozen=True)
class GreedyPlan:
    """The seeded random choices of :func:`greedy_k_center`, drawable before any row exists (so rows
    can be projected batch by batch as they are extracted, see ``memory.MemoryBuilder``).

    Attributes:
        first: index of the first centre.
        projection: (D, p) float32 Gaussian projection, or None for exact distances.
    """

    first: int
    projection: np.ndarray | None

    @classmethod
    def draw(cls, *, n_rows: int, dim: int, seed: int, projection_dim: int) -> GreedyPlan:
        rng = np.random.default_rng(seed)
        first = int(rng.integers(n_rows))
        projection = None
        if 0 < projection_dim < dim:
            projection = rng.standard_normal((dim, projection_dim)).astype(np.float32) / math.sqrt(projection_dim)
        return cls(first=first, projection=projection)


def greedy_select(
    x: torch.Tensor, *, size: int, first: int, on_progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Greedy farthest-point selection of ``size`` rows of ``x`` (N, d), starting at row ``first``.

    Returns:
        (size,) int64 indices, unique, in selection order.
    """
    # Squared distances through one mat-vec per centre: |x - c|^2 = |x|^2 + |c|^2 - 2 x.c
    sq_norms = (x * x).sum(dim=1)

    def sq_dist_to(row: int) -> torch.Tensor:
        return (sq_norms + sq_norms[row] - 2.0 * (x @ x[row])).clamp_min_(0.0)

    selected = np.empty(size, dtype=np.int64)
    selected[0] = first
    min_dist = sq_dist_to(first)
    report_every = max(1, size // 100)
    for i in range(1, size):
        nxt = int(torch.argmax(min_dist))
        selected[i] = nxt
        torch.minimum(min_dist, sq_dist_to(nxt), out=min_dist)
        if on_progress is not None and i % report_every == 0:
            on_progress(i, size)
    if on_progress is not None:
        on_progress(size, size)
    return selected


def covering_radius(features: np.ndarray, centres: np.ndarray) -> float:
    """max over rows of the distance to the nearest centre: the quantity k-center minimises.

    Args:
        features: (N, D) float32; centres: (m, D) float32.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32))
    nearest = torch.full((x.shape[0],), float("inf"))
    for chunk in torch.split(c, 1024):
        nearest = torch.minimum(nearest, torch.cdist(x, chunk).min(dim=1).values)
    return float(nearest.max())
