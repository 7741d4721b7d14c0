from __future__ import annotations

import numpy as np
import pytest

from bdi.errors import InvalidInputError
from bdi.patchcore.coreset import coreset_size, covering_radius, greedy_k_center


def _points(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_coreset_size_follows_contract_rounding() -> None:
    assert coreset_size(1025, 0.1) == 103
    assert coreset_size(30, 0.1) == 3
    assert coreset_size(5, 0.01) == 1
    assert coreset_size(7, 1.0) == 7


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_coreset_size_rejects_rate_outside_unit_interval(rate: float) -> None:
    with pytest.raises(InvalidInputError):
        coreset_size(10, rate)


def test_coreset_size_zero_rows_raises() -> None:
    with pytest.raises(InvalidInputError, match="No valid images"):
        coreset_size(0, 0.1)


def test_greedy_k_center_returns_requested_size_without_duplicates() -> None:
    idx = greedy_k_center(_points(), size=60, seed=0)
    assert idx.shape == (60,)
    assert len(set(idx.tolist())) == 60


def test_greedy_k_center_is_deterministic_for_a_seed() -> None:
    x = _points()
    np.testing.assert_array_equal(greedy_k_center(x, size=40, seed=3), greedy_k_center(x, size=40, seed=3))
    assert not np.array_equal(greedy_k_center(x, size=40, seed=3), greedy_k_center(x, size=40, seed=4))


def test_greedy_k_center_does_not_touch_global_rng() -> None:
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    greedy_k_center(_points(), size=10, seed=0)
    assert np.random.rand() == expected


def test_full_rate_keeps_original_order() -> None:
    np.testing.assert_array_equal(greedy_k_center(_points(50), size=50), np.arange(50))


@pytest.mark.parametrize("projection_dim", [0, 16])
def test_covering_radius_beats_random_subset_of_same_size(projection_dim: int) -> None:
    # Patch features have low intrinsic dimension: 4-D latent points embedded in 64-D.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1000, 4)) @ rng.standard_normal((4, 64))).astype(np.float32)
    idx = greedy_k_center(x, size=50, seed=0, projection_dim=projection_dim)
    random_radii = [
        covering_radius(x, x[np.random.default_rng(s).choice(len(x), 50, replace=False)]) for s in range(5)
    ]
    assert covering_radius(x, x[idx]) <= min(random_radii)


def test_exact_greedy_reaches_the_classic_factor_two_bound_on_clusters() -> None:
    # 5 tight clusters: 5 centres must land one per cluster, radius ~ cluster spread.
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 8)).astype(np.float32) * 50
    x = np.concatenate([c + rng.standard_normal((100, 8)).astype(np.float32) * 0.1 for c in centres])
    idx = greedy_k_center(x, size=5, seed=0)
    assert len({int(i) // 100 for i in idx}) == 5


def test_exact_greedy_selects_what_the_reference_backend_selects() -> None:
    from bench.baselines import reference_greedy_k_center

    rows = _points(800, 24)
    np.testing.assert_array_equal(
        greedy_k_center(rows, size=80, seed=0, projection_dim=0), reference_greedy_k_center(rows, 80)
    )
