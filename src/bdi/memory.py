"""The PatchCore memory bank: L2-normalised coreset rows + a kNN index + what built them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .config import MemoryConfig
from .coreset import coreset_size, greedy_k_center
from .errors import InvalidInputError, ModelMismatchError
from .knn import KnnIndex

L2_EPS = 1e-8  # added to the row norm, as the legacy backend does


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation. (N, D) float → (N, D) float32."""
    rows = np.asarray(rows, dtype=np.float32)
    normalized: np.ndarray = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + L2_EPS)
    return normalized


@dataclass(frozen=True)
class Memory:
    """A fitted memory bank. Treated as immutable: ``fingerprint`` is computed once per instance.

    Attributes:
        embeddings: (m, D) float32, L2-normalised coreset rows (read-only arrays from ``fit_memory``
            and the store).
        token_shape: (Ht, Wt) grid of the images it was fitted on.
        metadata: JSON-able facts: coreset_rate, applied_rate, n_embeddings, n_images, the feature
            and memory config, weights identity. Everything that changes a score.
    """

    embeddings: np.ndarray
    token_shape: tuple[int, int]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def fingerprint(self) -> str:
        """Content hash (16 hex) identifying this exact bank; calibrations record it.

        Hashing the whole bank is costly for large banks; it is computed on first access and kept
        (``dataclasses.replace`` makes a new instance, so a new bank is always hashed again).
        """
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.embeddings, dtype=np.float32).tobytes())
        digest.update(json.dumps(list(self.token_shape)).encode())
        return digest.hexdigest()[:16]

    @property
    def l2_normalized(self) -> bool:
        """Whether rows (and so queries) are L2-normalised; memories without the flag (legacy) are."""
        return bool(self.metadata.get("l2_normalized", True))

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def fit_memory(
    embeddings: np.ndarray,
    *,
    token_shape: tuple[int, int],
    cfg: MemoryConfig,
    n_images: int,
    extra_metadata: Mapping[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
    normalize: bool = True,
) -> Memory:
    """Pool, normalise and subsample patch embeddings into a :class:`Memory`.

    Args:
        embeddings: (N, D) float32 raw patch embeddings of all OK images, N = n_images·Ht·Wt.
        cfg: coreset rate, seed and projection (resolved: ``MemoryConfig.resolved``).
        extra_metadata: feature/weights facts to store with the bank.
        normalize: L2-normalise the rows (API_CONTRACT §3.2); recorded, so scoring does the same.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise InvalidInputError("No valid images: no embeddings to build a memory from")
    if cfg.projection_dim is None:
        raise ValueError("fit_memory needs a resolved MemoryConfig (MemoryConfig.resolved(backbone))")
    rows = l2_normalize(embeddings) if normalize else np.ascontiguousarray(embeddings, dtype=np.float32)
    n_rows = rows.shape[0]
    size = coreset_size(n_rows, cfg.coreset_rate)
    selected = greedy_k_center(
        rows,
        size=size,
        seed=cfg.seed,
        projection_dim=cfg.projection_dim,
        on_progress=on_progress,
        device=device,
    )
    metadata: dict[str, Any] = {
        "coreset_rate": float(cfg.coreset_rate),
        "applied_rate": size / n_rows,
        "n_embeddings": int(n_rows),
        "n_images": int(n_images),
        "l2_normalized": bool(normalize),
        "memory": {
            "coreset_rate": cfg.coreset_rate,
            "seed": cfg.seed,
            "projection_dim": cfg.projection_dim,
            "knn_index": cfg.knn_index,
        },
    }
    metadata.update(extra_metadata or {})
    bank = np.ascontiguousarray(rows[selected])  # fancy indexing: a copy this function owns
    bank.flags.writeable = False  # the cached fingerprint must keep describing it
    return Memory(
        embeddings=bank,
        token_shape=(int(token_shape[0]), int(token_shape[1])),
        metadata=metadata,
    )


def build_index(memory: Memory, cfg: MemoryConfig, *, use_faiss: bool = True) -> KnnIndex:
    """The kNN index over a memory's rows, per ``cfg.knn_index`` (CPU; see ``KnnIndex.to_gpu``)."""
    return KnnIndex.build(memory.embeddings, factory=cfg.knn_index, use_faiss=use_faiss)


# The signature keys a memory must share with the extractor that scores against it (FeatureExtractor.signature).
SIGNATURE_KEYS = (
    "backbone", "input_size", "blocks", "neighbourhood", "depth", "embed_dim", "weights", "weights_sha256",
)


def check_features_match(memory: Memory, signature: Mapping[str, Any]) -> None:
    """Refuse to score with features unlike those the memory was fitted on.

    ``signature`` is the extractor's (``FeatureExtractor.signature()``); the memory's is the one stored at
    fit time in ``metadata["signature"]``. A memory without one (legacy files) is checked on its width only.

    Raises:
        ModelMismatchError: another backbone, blocks, input size, neighbourhood, depth or weights.
    """
    stored = memory.metadata.get("signature")
    if not isinstance(stored, Mapping):
        stored = {}
    differences = [
        f"{key} {stored.get(key)!r} vs {signature.get(key)!r}"
        for key in SIGNATURE_KEYS
        if key in stored and _comparable(stored.get(key)) != _comparable(signature.get(key))
    ]
    if differences:
        raise ModelMismatchError(
            "the stored memory was fitted with other features than this server extracts (fitted vs served: "
            + "; ".join(differences)
            + "); refit with /fit_ok or serve with BDI_BACKBONE / BDI_WEIGHTS it was fitted with"
        )
    if memory.dim != signature.get("embed_dim", memory.dim):
        raise ModelMismatchError(
            f"the stored memory has {memory.dim}-d features but this server extracts {signature['embed_dim']}-d "
            f"({signature.get('backbone')}); refit with /fit_ok or serve with the backbone it was fitted with"
        )


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
