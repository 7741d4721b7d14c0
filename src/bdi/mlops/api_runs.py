"""Best-effort MLflow runs for fits and calibrations made through the API (:class:`ApiRunLogger`)."""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from bdi.logging import slog
from bdi.mlops.outages import TrackingStatus
from bdi.mlops.params import weights_identity
from bdi.mlops.tracking import TrackingTarget, tracked_run

if TYPE_CHECKING:  # pragma: no cover - typing only
    from bdi.patchcore.calibration import Calibration
    from bdi.patchcore.memory import Memory
    from bdi.refs import ModelRef
    from bdi.service import FitResult

_LOG = logging.getLogger(__name__)


class ApiRunLogger:
    """InspectionService hooks that log fits and calibrations made through the API as MLflow runs.

    Each run carries the tag ``source=api``. Best-effort: any failure is logged as the
    ``tracking.error`` event and swallowed, so a tracking outage never fails a fit. With
    ``background=True`` runs are logged by one daemon thread from a bounded queue (``queue_size``):
    a slow or unreachable server cannot delay a request, a full queue drops the run with a
    ``tracking.dropped`` warning, and :meth:`close` waits at most its timeout (the thread never
    holds the process open). ``status`` (if given) is told whether each run reached the server.

    Usage: ``InspectionService(..., on_fit=logger.on_fit, on_calibrate=logger.on_calibrate)``.
    """

    def __init__(
        self,
        tracking: TrackingTarget,
        *,
        background: bool = False,
        queue_size: int = 64,
        status: TrackingStatus | None = None,
    ) -> None:
        self.tracking = tracking
        self.status = status
        self.dropped = 0
        self._closed = False
        self._queue: queue.Queue[tuple[str, ModelRef, Callable[[], None]] | None] = queue.Queue(
            maxsize=max(1, queue_size)
        )
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name="bdi-mlflow", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ hooks
    def on_fit(self, ref: ModelRef, result: FitResult, memory: Memory) -> None:
        """Log a ``fit_ok`` run: ref ids + memory metadata as params, counts and timings as metrics."""
        metadata = copy.deepcopy(dict(memory.metadata))
        self._submit("fit", ref, lambda: self._log_fit(ref, result, metadata, memory.fingerprint))

    def on_calibrate(self, ref: ModelRef, calib: Calibration) -> None:
        """Log a ``calibrate`` run: threshold, false-reject and escape rates, the calibration JSON."""
        self._submit("calibrate", ref, lambda: self._log_calibration(ref, calib))

    # ------------------------------------------------------------------ lifecycle
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the queued runs are logged (background mode); False when ``timeout_s`` ran out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking runs, give the queued ones up to ``timeout_s`` to be logged, stop the thread.

        Whatever is still queued after the timeout is dropped (``tracking.shutdown_timeout``).
        """
        self._closed = True
        if self._thread is None:
            return
        finished = self.flush(timeout_s)
        if not finished:
            pending = self._queue.qsize()
            slog("tracking.shutdown_timeout", pending=pending, timeout_s=timeout_s)
            _LOG.warning("MLflow logging did not finish within %ss; %d queued run(s) dropped", timeout_s, pending)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            return  # the daemon thread dies with the process
        self._thread.join(timeout=0 if not finished else timeout_s)

    # ------------------------------------------------------------------ internals
    def _submit(self, kind: str, ref: ModelRef, job: Callable[[], None]) -> None:
        if not self.tracking.enabled:
            return
        if self._thread is None:
            self._guarded(kind, ref, job)
            return
        if self._closed:
            self._report(kind, ref, RuntimeError("the MLflow logger is closed"))
            return
        try:
            self._queue.put_nowait((kind, ref, job))
        except queue.Full:
            self.dropped += 1
            slog("tracking.dropped", kind=kind, queue_size=self._queue.maxsize, dropped_total=self.dropped,
                 recipe_id=ref.recipe_id, model_key=ref.model_key)
            _LOG.warning("MLflow logging queue full (%d): %s run of %s dropped", self._queue.maxsize, kind,
                         ref.model_key)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._guarded(*item)
            finally:
                self._queue.task_done()

    def _guarded(self, kind: str, ref: ModelRef, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # noqa: BLE001 - best effort by contract: tracking never fails a fit
            self._report(kind, ref, exc)
            if self.status is not None:
                self.status.set("unreachable", error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            if self.status is not None:
                self.status.set("ok")

    @staticmethod
    def _report(kind: str, ref: ModelRef, exc: BaseException) -> None:
        slog("tracking.error", kind=kind, error=f"{type(exc).__name__}: {exc}", recipe_id=ref.recipe_id,
             role_id=ref.role_id, roi_id=ref.roi_id, model_key=ref.model_key)

    def _log_fit(self, ref: ModelRef, result: FitResult, metadata: Mapping[str, Any], fingerprint: str) -> None:
        tags = {"source": "api", "kind": "fit", **ref.to_dict(), "memory_fingerprint": fingerprint,
                **weights_identity(metadata)}
        with tracked_run(self.tracking,
                         run_name=f"api-fit-{ref.recipe_id}-{ref.model_key}", tags=tags) as run:
            run.log_params({"ref": ref.to_dict(), **metadata})
            run.log_metrics({
                "n_embeddings": result.n_embeddings,
                "coreset_size": result.coreset_size,
                "coreset_rate_applied": result.coreset_rate_applied,
                "n_images": result.n_images,
                "timings_ms": dict(result.timings_ms),
            })
            run.log_dict({"n_embeddings": result.n_embeddings, "coreset_size": result.coreset_size,
                          "token_shape": list(result.token_shape),
                          "coreset_rate_requested": result.coreset_rate_requested,
                          "coreset_rate_applied": result.coreset_rate_applied, "fingerprint": fingerprint,
                          "metadata": metadata}, "fit_result.json")
        slog("tracking.run_logged", kind="fit", run_id=run.run_id, model_key=ref.model_key)

    def _log_calibration(self, ref: ModelRef, calib: Calibration) -> None:
        body = calib.to_dict()
        tags = {"source": "api", "kind": "calibrate", **ref.to_dict(),
                "memory_fingerprint": calib.memory_fingerprint}
        if calib.source is not None:  # "manual": a threshold an operator set (/calibrate_manual)
            tags["calibration_source"] = calib.source
        params: dict[str, Any] = {"ref": ref.to_dict(), **{k: body[k] for k in ("score_percentile", "area_mm2_thr",
                                                                                   "mm_per_px") if k in body}}
        with tracked_run(self.tracking,
                         run_name=f"api-calibrate-{ref.recipe_id}-{ref.model_key}", tags=tags) as run:
            run.log_params(params)
            run.log_metrics(calib.metrics())
            run.log_dict(body, "calibration.json")
        slog("tracking.run_logged", kind="calibrate", run_id=run.run_id, model_key=ref.model_key)
