"""Shadow mode: a ``challenger`` version is scored on live requests and logged; decisions stay the champion's.

With ``BDI_REGISTRY_SHADOW_ALIAS=challenger`` the registry follower also syncs that alias's holders into
``<models dir>/shadow/<alias>`` (their own ModelStore root). After every successful ``/infer`` the
server hands the request to :class:`ShadowScorer`, which scores the same crop with the challenger of the
same model (if there is one) on its own worker thread, after the answer has gone out, and logs one
``infer.shadow`` event: both versions, scores, thresholds and decisions, and whether they agree. The
queue is bounded: under load shadow requests are dropped (``infer.shadow_dropped``), never the answer.
The backbone is shared with the champion's service (its forward pass is serialised by a lock), so
shadow scoring costs one more forward pass per request on the same device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdi.errors import BDIError, NotFittedError
from bdi.logging import slog
from bdi.refs import ModelRef

SHADOW_DIR = "shadow"
QUEUE_SIZE = 16


def shadow_models_dir(models_dir: Path, alias: str) -> Path:
    """Where the holders of ``alias`` are synced for shadow scoring."""
    return Path(models_dir) / SHADOW_DIR / alias


@dataclass(frozen=True)
class ShadowRequest:
    ref: ModelRef
    image: bytes
    shape: str | Mapping[str, Any] | None
    mm_per_px: float
    champion: Mapping[str, Any]  # score, threshold, decision, lineage of the answer given


class ShadowScorer:
    """Scores live requests with the challenger on one worker thread (``on_infer`` is the service hook)."""

    def __init__(self, service: Any, *, alias: str, queue_size: int = QUEUE_SIZE) -> None:
        """``service``: an ``InspectionService`` over the shadow models dir (no hooks of its own)."""
        self.service = service
        self.alias = alias
        self._queue: queue.Queue[ShadowRequest | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="bdi-shadow", daemon=True)
        self._thread.start()

    def on_infer(self, ref: ModelRef, *, image: bytes, shape: str | Mapping[str, Any] | None, mm_per_px: float,
                 outcome: Any) -> None:
        """Queue a shadow scoring of a request the champion answered (never blocks, never raises)."""
        lineage = outcome.lineage or {}
        request = ShadowRequest(ref=ref, image=image, shape=shape, mm_per_px=mm_per_px, champion={
            "score": float(outcome.result.score), "threshold": outcome.threshold, "decision": outcome.decision,
            "version": lineage.get("registered_version"), "model": lineage.get("registered_model"),
        })
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            slog("infer.shadow_dropped", model_key=ref.model_key, alias=self.alias)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until the queued requests are scored (tests, shutdown)."""
        done = threading.Event()

        def wait_all() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait_all, daemon=True).start()
        done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            request = self._queue.get()
            try:
                if request is None:
                    return
                self._score(request)
            finally:
                self._queue.task_done()

    def _score(self, request: ShadowRequest) -> None:
        ref = request.ref
        try:
            outcome = self.service.infer(ref=ref, mm_per_px=request.mm_per_px, image=request.image,
                                         shape=request.shape, include_heatmap=False)
        except NotFittedError:
            return  # no challenger for this model
        except BDIError as exc:  # e.g. a challenger without a usable calibration
            slog("infer.shadow_error", model_key=ref.model_key, alias=self.alias, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shadow scoring must never affect serving; it is reported
            slog("infer.shadow_error", model_key=ref.model_key, alias=self.alias,
                 error=f"{type(exc).__name__}: {exc}")
            return
        lineage = outcome.lineage or {}
        champion = request.champion
        slog("infer.shadow", model_key=ref.model_key, recipe_id=ref.recipe_id, role_id=ref.role_id,
             roi_id=ref.roi_id, alias=self.alias, champion=dict(champion),
             challenger={"score": float(outcome.result.score), "threshold": outcome.threshold,
                         "decision": outcome.decision, "version": lineage.get("registered_version"),
                         "model": lineage.get("registered_model")},
             agree=outcome.decision == champion["decision"])
