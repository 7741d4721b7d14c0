"""Nearest-neighbour search over the memory bank: FAISS when importable, torch otherwise.

The index type is a faiss ``index_factory`` string ("Flat" = exact ``IndexFlatL2``, as the legacy
backend; "IVF256,Flat" or "HNSW32" for large banks). Distances returned are squared L2, like faiss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bdi.errors import InvalidInputError, StorageError

log = logging.getLogger(__name__)

try:  # faiss is a hard dependency of the default install, but the fallback keeps bdi usable without it
    import faiss

    FAISS_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where faiss is absent
    # None keeps ``bdi.patchcore.knn.faiss`` defined; every use is guarded by FAISS_AVAILABLE (or a faiss backend),
    # and mypy cannot express "the typed faiss module, or None when absent" for a module name.
    faiss = None  # type: ignore[assignment]
    FAISS_AVAILABLE = False


def faiss_gpu_count() -> int:
    if not FAISS_AVAILABLE or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # faiss-cpu builds may raise instead of returning 0
        return 0


@dataclass
class KnnIndex:
    """A searchable set of (m, D) float32 rows. Build with :meth:`build` or :meth:`deserialize`."""

    dim: int
    size: int
    backend: str  # "faiss" | "faiss-gpu" | "torch"
    _faiss_index: Any = None
    _rows: torch.Tensor | None = None
    _gpu_resources: Any = None  # keeps faiss GPU resources alive as long as the index

    @classmethod
    def build(
        cls,
        rows: np.ndarray,
        *,
        factory: str = "Flat",
        use_faiss: bool = True,
    ) -> KnnIndex:
        """Index ``rows`` (m, D) float32 on the CPU (see :meth:`to_gpu`). IVF indexes are trained on
        the rows themselves."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise InvalidInputError(f"cannot index an empty or non-2-D memory bank (shape {rows.shape})")
        m, dim = rows.shape
        if not (use_faiss and FAISS_AVAILABLE):
            return cls(dim=dim, size=m, backend="torch", _rows=torch.from_numpy(rows.copy()))
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise InvalidInputError(f"invalid knn_index {factory!r}: {exc}") from exc
        if not index.is_trained:
            index.train(rows)
        index.add(rows)
        return cls(dim=dim, size=m, backend="faiss", _faiss_index=index)

    def to_gpu(self, device: int = 0) -> KnnIndex:
        """A GPU copy when faiss-gpu and a valid device exist; otherwise ``self`` unchanged."""
        if self.backend != "faiss" or faiss_gpu_count() <= device:
            return self
        try:
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, device, self._faiss_index)
        except Exception as exc:  # transfer failures keep the CPU index (docs/contract.md "Nearest-neighbour index")
            log.warning("faiss.gpu.transfer_failed: %s", exc)
            return self
        log.info("faiss.gpu.enabled: device %d", device)
        return KnnIndex(
            dim=self.dim, size=self.size, backend="faiss-gpu", _faiss_index=gpu_index, _gpu_resources=resources
        )

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and indices of the k nearest rows.

        Args:
            queries: (Q, D) float32.
        Returns:
            (Q, k) float32 squared distances, (Q, k) int64 indices.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"query dimension {queries.shape[-1]} does not match the memory dimension {self.dim}"
            )
        k = min(k, self.size)
        if self._faiss_index is not None:
            dist, idx = self._faiss_index.search(queries, k)
            return dist.astype(np.float32), idx.astype(np.int64)
        assert self._rows is not None
        q = torch.from_numpy(queries)
        best_d: list[torch.Tensor] = []
        best_i: list[torch.Tensor] = []
        for chunk in torch.split(q, 4096):
            d2 = torch.cdist(chunk, self._rows).square()
            values, indices = torch.topk(d2, k, dim=1, largest=False)
            best_d.append(values)
            best_i.append(indices)
        return torch.cat(best_d).numpy().astype(np.float32), torch.cat(best_i).numpy().astype(np.int64)

    def serialize(self) -> bytes:
        """faiss ``serialize_index`` bytes of the CPU index (the ``_index.faiss`` file)."""
        if self._faiss_index is None:
            raise StorageError("the torch fallback index has no faiss serialisation")
        index = self._faiss_index
        if self.backend == "faiss-gpu":
            index = faiss.index_gpu_to_cpu(index)
        return bytes(faiss.serialize_index(index))

    @classmethod
    def deserialize(cls, data: bytes) -> KnnIndex:
        if not FAISS_AVAILABLE:
            raise StorageError("faiss is not installed: cannot read a .faiss index")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise StorageError(f"corrupt faiss index: {exc}") from exc
        return cls(dim=int(index.d), size=int(index.ntotal), backend="faiss", _faiss_index=index)
