"""What is stored for one model (docs/contract.md "GET /state", "GET /manifest"), read as one version."""

from __future__ import annotations

from typing import Any

from bdi.errors import CalibrationMissingError
from bdi.patchcore.calibration import Calibration
from bdi.patchcore.memory import Memory
from bdi.refs import ModelRef
from bdi.service.context import ServiceContext
from bdi.service.results import ModelManifest, ModelSnapshot, ModelState
from bdi.storage import model_lock
from bdi.storage.lineage import lineage_view, read_lineage


class ModelStatus:
    """Whether a model is fitted and calibrated, its calibration, samples and lineage."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def state(self, ref: ModelRef) -> ModelState:
        memory, calib, lineage = self._snapshot(ref)
        return ModelState(ref=ref, memory_fitted=memory is not None, calib_present=calib is not None,
                          lineage=lineage)

    def manifest(self, ref: ModelRef) -> ModelManifest:
        memory, calib, lineage = self._snapshot(ref)
        return ModelManifest(ref=ref, memory=memory is not None, calib=calib,
                             datasets=self._ctx.datasets.listing(ref.dataset_ref()), lineage=lineage)

    def progress(self, ref: ModelRef) -> dict[str, Any]:
        """How far the last fit or calibration of ``ref`` from the API got (``bdi.storage.progress``):
        ``state`` running/done/failed, or ``idle`` with ``job`` None when none has run on this models dir."""
        doc = self._ctx.progress.read(ref)
        if doc is None:
            return {"job": None, "state": "idle", "stage": None, "done": 0, "total": 0, "stages": {},
                    "started_at_utc": None, "updated_at_utc": None, "error": None}
        return doc

    def snapshot(self, ref: ModelRef) -> ModelSnapshot:
        """The served memory's fingerprint and the stored threshold (the audit trail's before and after)."""
        ctx = self._ctx
        with model_lock.reading(ctx.store, ref):
            memory = ctx.memory_or_none(ref)
            document = ctx.store.calibrations.document(ref)
        threshold = document.get("threshold") if document is not None else None
        return ModelSnapshot(memory_fingerprint=memory.fingerprint if memory is not None else None,
                             threshold=float(threshold) if isinstance(threshold, (int, float)) else None)

    def _snapshot(self, ref: ModelRef) -> tuple[Memory | None, dict[str, Any] | None, dict[str, Any] | None]:
        """Memory, the calibration document as stored and the lineage view of one model, read together
        (``bdi.storage.model_lock``)."""
        ctx = self._ctx
        with model_lock.reading(ctx.store, ref):
            memory = ctx.memory_or_none(ref)
            document = ctx.store.calibrations.document(ref)
            sidecar = read_lineage(ctx.store, ref)
        return memory, document, lineage_view(memory=memory, calib=self._calibration(document), lineage=sidecar)

    def _calibration(self, document: dict[str, Any] | None) -> Calibration | None:
        """The typed calibration of a stored document (as :meth:`bdi.storage.calibrations.CalibrationFiles.load`
        reads it); None when there is none or it has no threshold."""
        if document is None:
            return None
        try:
            return Calibration.from_dict(document, defaults=self._ctx.settings.model.scoring)
        except CalibrationMissingError:
            return None
