"""Reading a stored model for scoring: :func:`load_patchcore` is the one place that does it (memory, index or
its in-memory fallback, calibration checked against the memory), for the service, the MLflow pyfunc and the
evaluate stage."""

from __future__ import annotations

from bdi.config import MemoryConfig, ScoringConfig
from bdi.errors import NotFittedError
from bdi.logging import slog
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.knn import FAISS_AVAILABLE
from bdi.patchcore.memory import build_index, check_features_match, fitted_scoring
from bdi.patchcore.model import PatchCoreModel
from bdi.refs import ModelRef
from bdi.storage.store import ModelStore


def load_patchcore(
    store: ModelStore,
    ref: ModelRef,
    *,
    extractor: FeatureExtractor,
    scoring: ScoringConfig,
    memory_cfg: MemoryConfig,
    endpoint: str,
    require_index: bool = False,
    calibrated: bool = True,
) -> PatchCoreModel:
    """The model ``ref`` of ``store``, scoring with ``extractor``.

    Without an index file (or without faiss) the index is built in memory from the rows with
    ``memory_cfg``, unless ``require_index`` and faiss is installed. ``calibrated``: with the stored
    calibration (:meth:`PatchCoreModel.calibrated`), else scoring with ``scoring`` and no threshold.

    Raises:
        NotFittedError: no memory (or a required index file is missing); ``endpoint`` names the caller.
        ModelMismatchError: the memory was fitted with other features than ``extractor``'s.
        CalibrationMissingError: ``calibrated`` and no calibration applies to the memory.
    """
    loaded = store.load_model(ref)
    if loaded is None:
        slog("infer.not_fitted", why_not_fitted="memory_missing", model_key=ref.model_key)
        raise NotFittedError(endpoint)
    check_features_match(loaded.memory, extractor.signature())
    index = loaded.index
    if index is None:
        if require_index and FAISS_AVAILABLE:
            slog("infer.not_fitted", why_not_fitted="index_missing", model_key=ref.model_key)
            raise NotFittedError(endpoint, detail="index file missing")
        # no index file (or no faiss): search an in-memory index built from the rows
        index = build_index(loaded.memory, memory_cfg, use_faiss=FAISS_AVAILABLE)
    # the image score's rule the memory was fitted with (top-k), whatever this process's settings say
    scoring = fitted_scoring(loaded.memory, scoring)
    model = PatchCoreModel(extractor=extractor, memory=loaded.memory, index=index, scoring=scoring)
    return model.calibrated(store.calibrations.load(ref, defaults=scoring)) if calibrated else model
