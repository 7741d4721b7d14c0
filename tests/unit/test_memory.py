from __future__ import annotations

import numpy as np

from bdi.backbones import DINOV2_VITS14
from bdi.config import MemoryConfig
from bdi.memory import fit_memory


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
