"""The reference backend's algorithms, re-stated only as baselines to measure against (and to pin
compatibility in tests). Not used by bdi."""

from __future__ import annotations

import numpy as np


def reference_greedy_k_center(rows: np.ndarray, size: int) -> np.ndarray:
    """The legacy backend's coreset (docs/contract.md "Memory and coreset"): NumPy, first centre from default_rng(0),
    one full ``norm(x - c)`` pass per centre. Kept here only as the baseline being measured."""
    first = int(np.random.default_rng(0).integers(rows.shape[0]))
    selected = [first]
    min_dist = np.linalg.norm(rows - rows[first], axis=1)
    for _ in range(1, size):
        nxt = int(np.argmax(min_dist))
        selected.append(nxt)
        min_dist = np.minimum(min_dist, np.linalg.norm(rows - rows[nxt], axis=1))
    return np.asarray(selected)
