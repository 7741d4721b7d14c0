"""Monitoring (docs/monitoring.md): reading the inspection record (``GET /inspections``), the drift of every
recorded model against its calibration's reference with its feedback rates (``GET /monitor``, the ``/health``
warnings, gauges), and operator feedback (``POST /feedback``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from bdi.config import Settings
from bdi.errors import BDIError
from bdi.logging import slog
from bdi.monitoring.drift import RoiDrift, evaluate_roi
from bdi.monitoring.drift_state import persist_statuses
from bdi.monitoring.feedback import Feedback, feedback_rates, read_feedback
from bdi.monitoring.record import (
    InspectionPage,
    InspectionQuery,
    InspectionRecord,
    inspections_dir,
    query_records,
    read_records,
)
from bdi.refs import ModelRef
from bdi.service.context import ServiceContext
from bdi.service.feedback import FeedbackRequest, give_feedback
from bdi.storage.store import ModelStore


class Monitoring:
    """What the record says about the served models: pages of it, and their drift."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def inspections(self, query: InspectionQuery) -> InspectionPage:
        """``GET /inspections``: the records matching ``query``, newest first, one page after its cursor."""
        return query_records(inspections_dir(self._ctx.settings.models_dir), query)

    def feedback(self, req: FeedbackRequest) -> Feedback:
        """``POST /feedback``: :func:`bdi.service.feedback.give_feedback`."""
        return give_feedback(self._ctx, req)

    def drift(self, *, persist: bool = True) -> list[RoiDrift]:
        """:func:`evaluate_all` over this service's settings and store."""
        return evaluate_all(self._ctx.settings, self._ctx.store, persist=persist)


def evaluate_all(settings: Settings, store: ModelStore, *, persist: bool = True) -> list[RoiDrift]:
    """The drift of every model that has records, by recipe/role/roi/model_key: its calibration's reference against
    its last ``drift_window`` records scored by the calibrated memory. ``persist``: record the statuses (their
    ``since``, the ``/health`` warnings) in the drift state file. Needs no feature extractor: the CLI and a metrics
    collector call it with a bare :class:`ModelStore`."""
    root = inspections_dir(settings.models_dir)
    groups: dict[tuple[str, str, str, str], list[InspectionRecord]] = defaultdict(list)
    for record in read_records(root):  # newest first
        groups[(record.recipe_id, record.role_id, record.roi_id, record.model_key)].append(record)
    verdicts: dict[tuple[str, str, str, str], list[Feedback]] = defaultdict(list)
    for item in read_feedback(root):
        verdicts[(item.recipe_id, item.role_id, item.roi_id, item.model_key)].append(item)
    drifts: list[RoiDrift] = []
    for (recipe_id, role_id, roi_id, model_key), records in sorted(groups.items()):
        ids = {"recipe_id": recipe_id, "role_id": role_id, "roi_id": roi_id, "model_key": model_key}
        try:
            ref = ModelRef(**ids)
            calib = store.calibrations.load(ref, defaults=settings.model.scoring)
        except BDIError as exc:  # ids no longer valid, an unreadable or empty calibration: nothing to compare to
            slog("monitor.no_calibration", error=str(exc), model_key=model_key)
            calib = None
        fingerprint = calib.memory_fingerprint if calib is not None else None
        live = [r for r in records if r.memory_fingerprint == fingerprint][: settings.drift_window]
        drift = evaluate_roi(
            ids=ids, memory_fingerprint=fingerprint, reference=calib.reference if calib is not None else None,
            calibrated_ng_rate=calib.false_reject_rate if calib is not None else None, live=live,
            min_count=settings.drift_min_count)
        given = verdicts.get((recipe_id, role_id, roi_id, model_key))
        drifts.append(replace(drift, feedback=feedback_rates(given, records)) if given else drift)
    return persist_statuses(root, drifts) if persist and drifts else drifts
