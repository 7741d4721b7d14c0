"""The audit trail of the HTTP layer: :data:`AuditDep` gives a route an :class:`Auditor` whose
:meth:`~Auditor.change` wraps the state change, recording who, from where, which request and ROI, and the
model's memory fingerprint and threshold before and after (``bdi.security.audit``, docs/security.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, Request

from bdi.errors import BDIError, StorageError
from bdi.logging import slog
from bdi.refs import DatasetRef, ModelRef
from bdi.security.audit import AuditEvent, AuditLog
from bdi.security.keys import Principal
from bdi.service import InspectionService
from serving.auth import client_address


class Auditor:
    """Records the state changes of one request."""

    def __init__(self, *, log: AuditLog, service: InspectionService, principal: Principal, client: str,
                 request_id: str, route: str) -> None:
        self._log = log
        self._service = service
        self._principal = principal
        self._client = client
        self._request_id = request_id
        self._route = route

    @contextmanager
    def change(self, action: str, ref: ModelRef | DatasetRef, **detail: Any) -> Iterator[dict[str, Any]]:
        """Record ``action`` on ``ref`` once the block ends, with its outcome (``ok`` or the error's class
        name, then re-raised). A model's snapshot is read before and after; a dataset change has none (it does
        not change what serves). The block may add to the yielded ``detail``. A record that cannot be written
        fails a successful change (500); after a failed one the change's own error is the answer."""
        model = ref if isinstance(ref, ModelRef) else None
        roi = {"recipe_id": ref.recipe_id, "role_id": ref.role_id, "roi_id": ref.roi_id}
        if model is not None:
            roi["model_key"] = model.model_key
        before = self._snapshot(model)
        with self._recorded(action, detail, lambda: {"roi": roi, "before": before,
                                                      "after": self._snapshot(model)}) as extra:
            yield extra

    @contextmanager
    def event(self, action: str, **detail: Any) -> Iterator[dict[str, Any]]:
        """Record an action that touches no model (key management) once the block ends, with its outcome."""
        with self._recorded(action, detail) as extra:
            yield extra

    @contextmanager
    def _recorded(self, action: str, detail: dict[str, Any],
                  fields: Callable[[], dict[str, Any]] = dict) -> Iterator[dict[str, Any]]:
        """Append the record of the block once it ends: its outcome, ``detail`` as the block left it, and the
        ``fields`` read then (a model's snapshot after the change)."""
        extra = dict(detail)
        outcome = "ok"
        try:
            yield extra
        except Exception as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self._append(AuditEvent(action=action, outcome=outcome, key_id=self._principal.key_id,
                                    key_label=self._principal.label, client=self._client,
                                    request_id=self._request_id, route=self._route, detail=extra, **fields()))

    def _append(self, event: AuditEvent) -> None:
        try:
            self._log.append(event)
        except StorageError as exc:
            slog("audit.append_failed", level="error", action=event.action, outcome=event.outcome, error=str(exc))
            if event.outcome == "ok":
                raise  # a change the trail cannot record is not reported as a success (500 A, logged)

    def _snapshot(self, model: ModelRef | None) -> dict[str, Any] | None:
        if model is None:
            return None
        try:
            return asdict(self._service.snapshot(model))
        except BDIError as exc:  # an unreadable model is still recorded, with why it could not be read
            return {"memory_fingerprint": None, "threshold": None, "unreadable": type(exc).__name__}


async def get_auditor(request: Request) -> Auditor:
    principal = request.scope.get("state", {}).get("principal") or Principal.anonymous()
    route = getattr(request.scope.get("route"), "path", request.url.path)
    return Auditor(log=request.app.state.audit_log, service=request.app.state.service, principal=principal,
                   client=client_address(request.scope), request_id=str(request.state.request_id),
                   route=f"{request.method} {route}")


AuditDep = Annotated[Auditor, Depends(get_auditor)]
