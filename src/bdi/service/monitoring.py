"""Monitoring (docs/monitoring.md): reading the inspection record (``GET /inspections``)."""

from __future__ import annotations

from bdi.monitoring.record import InspectionPage, InspectionQuery, inspections_dir, query_records
from bdi.service.context import ServiceContext


class Monitoring:
    """What the record says about the served models: pages of it."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def inspections(self, query: InspectionQuery) -> InspectionPage:
        """``GET /inspections``: the records matching ``query``, newest first, one page after its cursor."""
        return query_records(inspections_dir(self._ctx.settings.models_dir), query)
