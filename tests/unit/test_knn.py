from __future__ import annotations

import numpy as np
import pytest

from bdi.errors import InvalidInputError
from bdi.patchcore.knn import KnnIndex, faiss_gpu_count


def _rows(n: int, d: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_faiss_and_torch_fallback_agree_on_nearest_neighbours() -> None:
    bank, queries = _rows(300), _rows(50, seed=1)
    faiss_index = KnnIndex.build(bank, use_faiss=True)
    torch_index = KnnIndex.build(bank, use_faiss=False)
    assert (faiss_index.backend, torch_index.backend) == ("faiss", "torch")
    d_f, i_f = faiss_index.search(queries, k=3)
    d_t, i_t = torch_index.search(queries, k=3)
    np.testing.assert_array_equal(i_f, i_t)
    np.testing.assert_allclose(d_f, d_t, rtol=1e-4, atol=1e-4)


def test_search_returns_squared_l2_distances() -> None:
    bank = np.array([[0, 0], [3, 4]], dtype=np.float32)
    dist, idx = KnnIndex.build(bank).search(np.array([[3, 4.5]], dtype=np.float32))
    assert idx[0, 0] == 1
    assert dist[0, 0] == pytest.approx(0.25)


def test_serialised_index_round_trips() -> None:
    bank, queries = _rows(100), _rows(10, seed=2)
    index = KnnIndex.build(bank)
    restored = KnnIndex.deserialize(index.serialize())
    np.testing.assert_array_equal(index.search(queries)[1], restored.search(queries)[1])
    assert restored.size == 100 and restored.dim == 24


def test_hnsw_index_type_is_configuration() -> None:
    bank = _rows(500)
    exact = KnnIndex.build(bank).search(bank[:20])[1]
    approx = KnnIndex.build(bank, factory="HNSW16").search(bank[:20])[1]
    assert (exact == approx).mean() >= 0.9


def test_invalid_index_factory_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="knn_index"):
        KnnIndex.build(_rows(10), factory="NotAnIndex")


def test_query_dimension_mismatch_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="dimension"):
        KnnIndex.build(_rows(10)).search(_rows(2, d=5))


def test_empty_bank_is_rejected() -> None:
    with pytest.raises(InvalidInputError):
        KnnIndex.build(np.empty((0, 4), dtype=np.float32))


def test_to_gpu_without_a_gpu_keeps_the_cpu_index() -> None:
    index = KnnIndex.build(_rows(20))
    if faiss_gpu_count() == 0:
        assert index.to_gpu(0) is index


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpu_count() == 0, reason="needs faiss-gpu and a CUDA device")
def test_gpu_index_agrees_with_cpu_index() -> None:
    bank, queries = _rows(500), _rows(50, seed=3)
    cpu = KnnIndex.build(bank)
    gpu = cpu.to_gpu(0)
    assert gpu.backend == "faiss-gpu"
    np.testing.assert_array_equal(cpu.search(queries)[1], gpu.search(queries)[1])
    assert KnnIndex.deserialize(gpu.serialize()).size == 500
