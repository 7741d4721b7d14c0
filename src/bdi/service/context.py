"""What every use case shares: the settings, the stores and the one feature extractor, and the reads they all
make the same way (decode within the limits, load a stored model, list a model's samples within the cap)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from bdi.config import ScoringConfig, Settings
from bdi.errors import StorageError
from bdi.logging import slog
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.imaging import decode_image
from bdi.patchcore.memory import Memory
from bdi.patchcore.model import PatchCoreModel
from bdi.refs import ModelRef
from bdi.service.limits import UploadLimits
from bdi.storage.datasets import DatasetStore, Sample
from bdi.storage.loading import load_patchcore
from bdi.storage.progress import ProgressStore
from bdi.storage.store import ModelStore


@dataclass(frozen=True)
class ServiceContext:
    """One ModelStore and its sample folders, scored with one feature extractor."""

    settings: Settings
    extractor: FeatureExtractor
    store: ModelStore
    datasets: DatasetStore

    @property
    def limits(self) -> UploadLimits:
        return UploadLimits.of(self.settings)

    @property
    def progress(self) -> ProgressStore:
        """The running fits' and calibrations' progress files, beside the models (``GET /progress``)."""
        return ProgressStore(self.store.root)

    def decode(self, data: bytes, *, name: str) -> np.ndarray:
        """The BGR image of ``data`` (uint8 (H, W, 3)), within the size and pixel limits."""
        limits = self.limits
        limits.check_file_size(len(data), name=name)
        return decode_image(data, max_pixels=limits.max_image_pixels, name=name)

    def model(
        self,
        ref: ModelRef,
        *,
        endpoint: str = "score",
        calibrated: bool = True,
        require_index: bool = False,
        scoring: ScoringConfig | None = None,
    ) -> PatchCoreModel:
        """The stored model ``ref`` scoring with this extractor (:func:`bdi.storage.loading.load_patchcore`):
        ``calibrated`` with the calibration that applies to it, else with ``scoring`` (default: the settings')."""
        return load_patchcore(
            self.store, ref, extractor=self.extractor, scoring=scoring or self.settings.model.scoring,
            memory_cfg=self.settings.model.memory, endpoint=endpoint, require_index=require_index,
            calibrated=calibrated,
        )

    def memory_or_none(self, ref: ModelRef) -> Memory | None:
        """The memory, or None when absent or unreadable (a corrupt file reads as "not fitted",
        so the GUI's refit repairs it instead of seeing a 500)."""
        try:
            return self.store.load_memory(ref)
        except StorageError as exc:
            slog("storage.memory_unreadable", error=str(exc), model_key=ref.model_key)
            return None

    def capped_samples(self, ref: ModelRef, labels: Iterable[str]) -> dict[str, list[Sample]]:
        """The stored samples of each label (a label once), refused as a whole when there are more than
        ``BDI_MAX_DATASET_IMAGES``: dataset-driven work is bounded before any image is read."""
        dataset = ref.dataset_ref()
        listed = {label: self.datasets.samples(dataset, label) for label in dict.fromkeys(labels)}
        self.limits.check_dataset_size(sum(len(samples) for samples in listed.values()))
        return listed
