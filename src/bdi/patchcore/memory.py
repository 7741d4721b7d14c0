"""The PatchCore memory bank: coreset rows (L2-normalised when the backbone says so) + a kNN index + what built them.

:func:`fit_memory` builds a bank from all patch rows at once; :class:`MemoryBuilder` builds the same
bank from rows fed batch by batch, holding only what the coreset needs: with the default projected
greedy, the (N, p) projection in RAM and the full rows in an anonymous temporary file, from which only
the selected rows are read back. A fit's memory then does not grow with N beyond the bank itself.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from bdi.backbones import Intensity
from bdi.config import MemoryConfig, ScoringConfig
from bdi.errors import InvalidInputError, ModelMismatchError
from bdi.patchcore.coreset import GreedyPlan, coreset_size, greedy_k_center, greedy_select
from bdi.patchcore.knn import KnnIndex

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
        digest.update(np.ascontiguousarray(self.embeddings, dtype=np.float32).data)  # the buffer, no copy
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
        normalize: L2-normalise the rows (docs/contract.md "Memory and coreset"); recorded, so scoring does the same.
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
    bank = np.ascontiguousarray(rows[selected])  # fancy indexing: a copy this function owns
    return _memory(bank, token_shape=token_shape, cfg=cfg, n_rows=n_rows, n_images=n_images,
                   extra_metadata=extra_metadata, normalize=normalize)


def _memory(
    bank: np.ndarray,
    *,
    token_shape: tuple[int, int],
    cfg: MemoryConfig,
    n_rows: int,
    n_images: int,
    extra_metadata: Mapping[str, Any] | None,
    normalize: bool,
) -> Memory:
    metadata: dict[str, Any] = {
        "coreset_rate": float(cfg.coreset_rate),
        "applied_rate": bank.shape[0] / n_rows,
        "n_embeddings": int(n_rows),
        "n_images": int(n_images),
        "l2_normalized": bool(normalize),
        "memory": {
            "coreset_rate": cfg.coreset_rate,
            "seed": cfg.seed,
            "projection_dim": cfg.projection_dim,
            "knn_index": cfg.knn_index,
            "fit_rotations": cfg.fit_rotations,
            "augment": cfg.augment,
            "unwrap": cfg.unwrap,
        },
    }
    metadata.update(extra_metadata or {})
    bank.flags.writeable = False  # the cached fingerprint must keep describing it
    return Memory(
        embeddings=bank,
        token_shape=(int(token_shape[0]), int(token_shape[1])),
        metadata=metadata,
    )


class MemoryBuilder:
    """:func:`fit_memory` fed batch by batch (``add``), for fits larger than RAM would like.

    The number of rows N is declared up front, so the seeded greedy choices (first centre, projection)
    are drawn before any row exists and each batch is normalised and projected as it arrives. What is
    held: with a projected greedy (``0 < projection_dim < D`` and rate < 1) the (N, p) float32
    projection in RAM and the normalised rows in an anonymous temporary file (gone when closed, or when
    the process dies); with ``memory_fit`` (rate 1) or an exact greedy, the (N, D) rows in RAM, which
    are then the bank itself or what the exact coreset needs. The result equals :func:`fit_memory` of
    the concatenated batches. Use as a context manager (or call :meth:`close`).
    """

    def __init__(
        self, *, n_rows: int, dim: int, cfg: MemoryConfig, device: str = "cpu", normalize: bool = True
    ) -> None:
        if n_rows < 1 or dim < 1:
            raise InvalidInputError("No valid images: no embeddings to build a memory from")
        if cfg.projection_dim is None:
            raise ValueError("MemoryBuilder needs a resolved MemoryConfig (MemoryConfig.resolved(backbone))")
        self._cfg = cfg
        self._normalize = normalize
        self._n_rows, self._dim = n_rows, dim
        self._device = device
        self.size = coreset_size(n_rows, cfg.coreset_rate)
        self._filled = 0
        self._plan = (
            GreedyPlan.draw(n_rows=n_rows, dim=dim, seed=cfg.seed, projection_dim=cfg.projection_dim)
            if self.size < n_rows else None
        )
        self._rows: np.ndarray | None = None
        self._projected: np.ndarray | None = None
        self._spill: Any = None
        if self._plan is None or self._plan.projection is None:
            self._rows = np.empty((n_rows, dim), dtype=np.float32)
        else:
            self._projected = np.empty((n_rows, self._plan.projection.shape[1]), dtype=np.float32)
            self._projection_t = torch.from_numpy(self._plan.projection).to(device)
            self._spill = tempfile.TemporaryFile(prefix="bdi-fit-rows-")

    def __enter__(self) -> MemoryBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    @property
    def n_added(self) -> int:
        return self._filled

    def add(self, embeddings: np.ndarray) -> None:
        """Append (n, D) raw patch embeddings (normalised here when asked, like :func:`fit_memory`)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self._dim:
            raise InvalidInputError(f"embeddings must be (n, {self._dim}), got {embeddings.shape}")
        n = embeddings.shape[0]
        if self._filled + n > self._n_rows:
            raise InvalidInputError(f"more than the declared {self._n_rows} embeddings")
        rows = l2_normalize(embeddings) if self._normalize else np.ascontiguousarray(embeddings, dtype=np.float32)
        start, stop = self._filled, self._filled + n
        if self._rows is not None:
            self._rows[start:stop] = rows
        else:
            assert self._projected is not None and self._spill is not None
            x = torch.from_numpy(rows).to(self._device)
            self._projected[start:stop] = (x @ self._projection_t).cpu().numpy()
            self._spill.write(np.ascontiguousarray(rows).data)
        self._filled = stop

    def _read_rows(self, selected: np.ndarray) -> np.ndarray:
        """The spilled rows ``selected``, in that order, read one by one: a memory map would fault in
        (and count as resident) neighbouring pages of the whole file."""
        spill = self._spill
        assert spill is not None
        spill.flush()
        row_bytes = self._dim * 4
        bank = np.empty((len(selected), self._dim), dtype=np.float32)
        for out, row in enumerate(selected):
            spill.seek(int(row) * row_bytes)
            if spill.readinto(bank[out].data) != row_bytes:
                raise OSError(f"short read of spilled row {int(row)}")
        return bank

    def build(
        self,
        *,
        token_shape: tuple[int, int],
        n_images: int,
        extra_metadata: Mapping[str, Any] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Memory:
        """Select the coreset and return the :class:`Memory` (every declared row must have been added)."""
        if self._filled != self._n_rows:
            raise InvalidInputError(f"got {self._filled} embeddings, {self._n_rows} were declared")
        if self._plan is None:  # keep every row, in order
            assert self._rows is not None
            bank = self._rows
            if on_progress is not None:
                on_progress(self.size, self.size)
        elif self._rows is not None:  # exact greedy over the full rows
            x = torch.from_numpy(self._rows).to(self._device)
            selected = greedy_select(x, size=self.size, first=self._plan.first, on_progress=on_progress)
            bank = np.ascontiguousarray(self._rows[selected])
        else:
            assert self._projected is not None and self._spill is not None
            x = torch.from_numpy(self._projected).to(self._device)
            selected = greedy_select(x, size=self.size, first=self._plan.first, on_progress=on_progress)
            del x
            self._projected = None
            bank = self._read_rows(selected)
        return _memory(bank, token_shape=token_shape, cfg=self._cfg, n_rows=self._n_rows, n_images=n_images,
                       extra_metadata=extra_metadata, normalize=self._normalize)


def fitted_scoring_metadata(scoring: ScoringConfig, *, map_offset: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """The scoring settings a fit stores with its memory (``metadata["scoring"]``), so that every scorer of the
    memory (/infer, calibration, evaluation, the pyfunc) uses the fit's: the image score's top-k, and where the
    map is drawn (``map_offset``, bdi.patchcore.alignment; measured when ``scoring.align_features``)."""
    return {"score_top_k": int(scoring.score_top_k), "map_offset_px": [float(v) for v in map_offset]}


def fitted_map_offset(memory: Memory) -> tuple[float, float]:
    """The (down, right) input px the memory's maps are drawn up and to the left (bdi.patchcore.alignment); a memory
    fitted before it was measured is drawn as it was fitted: (0, 0)."""
    stored = memory.metadata.get("scoring")
    value = stored.get("map_offset_px") if isinstance(stored, Mapping) else None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return 0.0, 0.0
    return float(value[0]), float(value[1])


def fitted_intensity(metadata: Mapping[str, Any]) -> Intensity:
    """What the fit did to each image's grey levels, from a memory's ``metadata["features"]["intensity"]``, so that
    the memory is scored the same way whatever the server's setting (``PatchCoreModel.score``, the pyfunc); a memory
    fitted before the setting existed: ``raw``."""
    features = metadata.get("features")
    value = features.get("intensity") if isinstance(features, Mapping) else None
    return "standardize" if value == "standardize" else "raw"


def fitted_scoring(memory: Memory, base: ScoringConfig) -> ScoringConfig:
    """``base`` with the scoring settings stored with ``memory`` at fit; a memory without them (fitted before
    they existed) scores as it was fitted: ``score_top_k`` 0, the percentile rule."""
    stored = memory.metadata.get("scoring")
    top_k = stored.get("score_top_k", 0) if isinstance(stored, Mapping) else 0
    return replace(base, score_top_k=int(top_k))


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
