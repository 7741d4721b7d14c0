"""bench.scoring_probe's distance rules, on a small real FAISS index."""

from __future__ import annotations

import numpy as np
import pytest

from bdi.patchcore.inference import patch_distances
from bdi.patchcore.knn import FAISS_AVAILABLE, KnnIndex
from bdi.patchcore.memory import l2_normalize
from bench.scoring_probe import MemoryNeighbours, distances_by

pytestmark = pytest.mark.skipif(not FAISS_AVAILABLE, reason="the probe reads the memory back from a FAISS index")


def _index() -> tuple[KnnIndex, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = l2_normalize(rng.normal(size=(64, 8)).astype(np.float32))
    return KnnIndex.build(rows), rng.normal(size=(16, 8)).astype(np.float32)


def test_nearest_is_the_library_rule_and_mean_of_one_neighbour_equals_it() -> None:
    index, queries = _index()
    expected = patch_distances(index, queries)
    np.testing.assert_allclose(distances_by("nearest", MemoryNeighbours())(index, queries), expected)
    np.testing.assert_allclose(distances_by("mean-knn:1", MemoryNeighbours())(index, queries), expected, rtol=1e-5)


def test_local_density_divides_by_the_nearest_rows_own_neighbour_distance() -> None:
    index, queries = _index()
    neighbours = MemoryNeighbours()
    got = distances_by("local-density:3", neighbours)(index, queries)
    _, row_d, _ = neighbours(index, 3)
    _, ids = index.search(l2_normalize(queries), k=1)
    np.testing.assert_allclose(got, patch_distances(index, queries) / (row_d[ids[:, 0]].mean(axis=1) + 1e-6),
                               rtol=1e-5)


def test_reweighting_only_ever_lowers_a_distance() -> None:
    index, queries = _index()
    got = distances_by("reweighted:4", MemoryNeighbours())(index, queries)
    assert np.all(got <= patch_distances(index, queries) + 1e-6) and np.all(got > 0)


def test_peak_places_counts_peaks_inside_the_mask_and_on_the_border() -> None:
    from bench.quality_data import Sample
    from bench.scoring_probe import peak_places

    def sample(label: int, mask: np.ndarray | None) -> Sample:
        return Sample(name="x", data=b"", image=np.zeros((8, 8, 3), np.uint8), label=label,
                      defect_class="crack" if label else "good", mask=mask)

    mask = np.zeros((8, 8), bool)
    mask[3:5, 3:5] = True
    inside, border = np.zeros((8, 8)), np.zeros((8, 8))
    inside[4, 4] = 1.0
    border[0, 5] = 1.0
    got = peak_places([sample(1, mask), sample(1, mask), sample(0, None)], [inside, border, border])
    assert got == {"ok": 1, "ng": 2, "ng_in_mask": 1, "ok_on_border": 1, "ng_on_border": 1}
