from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from bdi.backbones import DINOV2_VITS14
from bdi.config import MemoryConfig
from bdi.errors import InvalidInputError
from bdi.patchcore.memory import MemoryBuilder, fit_memory


def _cfg(**values: object) -> MemoryConfig:
    return MemoryConfig(**values).resolved(DINOV2_VITS14)  # type: ignore[arg-type]


def _embeddings(n: int = 1025, d: int = 32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32) * 5


def test_fit_memory_applies_contract_coreset_size_and_rates() -> None:
    memory = fit_memory(_embeddings(), token_shape=(5, 5), cfg=_cfg(coreset_rate=0.1), n_images=41)
    assert memory.size == 103
    assert memory.metadata["coreset_rate"] == 0.1
    assert memory.metadata["applied_rate"] == 103 / 1025
    assert memory.metadata["n_embeddings"] == 1025


def test_memory_rows_are_unit_norm() -> None:
    memory = fit_memory(_embeddings(), token_shape=(5, 5), cfg=_cfg(), n_images=41)
    np.testing.assert_allclose(np.linalg.norm(memory.embeddings, axis=1), 1.0, atol=1e-5)


def test_fingerprint_changes_with_content_and_is_stable() -> None:
    a = fit_memory(_embeddings(), token_shape=(5, 5), cfg=_cfg(seed=0), n_images=41)
    b = fit_memory(_embeddings(), token_shape=(5, 5), cfg=_cfg(seed=0), n_images=41)
    c = fit_memory(_embeddings(), token_shape=(5, 5), cfg=_cfg(seed=1), n_images=41)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_memory_fit_rate_one_keeps_every_patch() -> None:
    memory = fit_memory(_embeddings(50), token_shape=(5, 10), cfg=_cfg(coreset_rate=1.0), n_images=1)
    assert memory.size == 50
    assert memory.metadata["applied_rate"] == 1.0


@pytest.mark.parametrize(
    "cfg",
    [MemoryConfig(projection_dim=128), MemoryConfig(projection_dim=0),
     MemoryConfig(coreset_rate=1.0, projection_dim=128)],
    ids=["projected", "exact", "keep-all"],
)
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_builder_fed_in_batches_builds_the_same_bank_as_fit_memory(cfg: MemoryConfig, normalize: bool) -> None:
    rows = _embeddings(n=2048, d=256)
    whole = fit_memory(rows, token_shape=(8, 8), cfg=cfg, n_images=32, normalize=normalize)
    with MemoryBuilder(n_rows=2048, dim=256, cfg=cfg, normalize=normalize) as builder:
        for start in range(0, 2048, 300):
            builder.add(rows[start:start + 300])
        built = builder.build(token_shape=(8, 8), n_images=32)
    assert built.fingerprint == whole.fingerprint
    assert built.metadata == whole.metadata


def test_builder_refuses_more_or_fewer_rows_than_declared() -> None:
    with MemoryBuilder(n_rows=10, dim=4, cfg=MemoryConfig(projection_dim=2)) as builder:
        builder.add(_embeddings(n=6, d=4))
        with pytest.raises(InvalidInputError, match="more than the declared 10"):
            builder.add(_embeddings(n=6, d=4))
        with pytest.raises(InvalidInputError, match="got 6 embeddings, 10 were declared"):
            builder.build(token_shape=(1, 1), n_images=6)


def test_projected_builder_keeps_the_full_rows_out_of_ram() -> None:
    """Only the (N, p) projection is an in-memory array; the full rows go to an anonymous temp file."""
    tracemalloc.start()
    try:
        with MemoryBuilder(n_rows=8192, dim=512, cfg=MemoryConfig(projection_dim=32)) as builder:
            for _ in range(16):
                builder.add(_embeddings(n=512, d=512))
            during = tracemalloc.get_traced_memory()[0]
            memory = builder.build(token_shape=(8, 8), n_images=128)
    finally:
        tracemalloc.stop()
    full_rows = 8192 * 512 * 4  # 16 MiB
    assert during < full_rows / 4  # the projection (1 MiB) and one batch, not the rows
    assert memory.size == 820
