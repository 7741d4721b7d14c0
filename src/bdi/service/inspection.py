"""InspectionService: one object per process that holds the use cases over one ModelStore and one feature extractor.

Each use case follows its route's processing order in docs/contract.md "Endpoints" (the first failure wins), with
the differences of docs/design.md: bad input is an ``InvalidInputError`` (never a 500), uploads are checked
before anything is stored, calibrations record the memory they belong to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bdi.config import Settings
from bdi.monitoring.drift_state import DriftStateReader
from bdi.monitoring.record import inspections_dir
from bdi.patchcore.calibration import Calibration
from bdi.patchcore.features import FeatureExtractor, cuda_available
from bdi.refs import ModelRef
from bdi.runtime.select import RuntimeStatus, attach_runtime, configure_threads, current_status
from bdi.service.calibrating import CalibrateHook, Calibrating
from bdi.service.context import ServiceContext
from bdi.service.fitting import FitHook, Fitting
from bdi.service.inferring import InferHook, Inferring
from bdi.service.limits import UploadLimits
from bdi.service.monitoring import Monitoring
from bdi.service.recording import inspection_log
from bdi.service.samples import Samples
from bdi.service.status import ModelStatus
from bdi.service.threshold_check import check_detection, record_detection
from bdi.storage.alerts import AlertsReader
from bdi.storage.cache import StoreCacheHook
from bdi.storage.datasets import DatasetStore
from bdi.storage.fsio import remove_orphan_temp_files
from bdi.storage.store import ModelStore


def remove_orphan_files(settings: Settings) -> list[Path]:
    """Remove the temporary files that a crashed writer left under the models dir (older than
    ``settings.orphan_tmp_age_s``); the removed paths."""
    return remove_orphan_temp_files(settings.models_dir, older_than_s=settings.orphan_tmp_age_s)


class InspectionService:
    """Fit, calibrate and infer over one ModelStore with one feature extractor.

    Build one per process (the extractor is heavy); it holds no state that decides correctness:
    every call re-reads the store, whose caches are keyed by file identity. The use cases are its
    attributes (``fitting``, ``calibrating``, ``inferring``, ``samples``, ``status``); the methods below
    are the entry points serving, pipelines and benchmarks call.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        extractor: FeatureExtractor,
        store: ModelStore | None = None,
        datasets: DatasetStore | None = None,
        on_fit: FitHook | None = None,
        on_calibrate: CalibrateHook | None = None,
        runtime: RuntimeStatus | None = None,
        on_infer: InferHook | None = None,
        on_cache_event: StoreCacheHook | None = None,
    ) -> None:
        """``on_cache_event(cache, event)``: told of the store's cache hits, misses and loads (serving's metrics;
        only with the store built here)."""
        self.settings = settings
        self.extractor = extractor
        # what runs the feature net (from_settings attaches BDI_RUNTIME; a given extractor keeps its own)
        self.runtime = runtime or current_status(extractor, threads=settings.intra_op_threads())
        self.store = store or ModelStore(
            settings.models_dir,
            cache_max_entries=settings.cache_max_entries,
            faiss_gpu_device=settings.model.memory.gpu_device if settings.model.memory.prefer_gpu else None,
            on_cache_event=on_cache_event,
        )
        self.datasets = datasets or DatasetStore(settings.models_dir)
        ctx = ServiceContext(settings=settings, extractor=extractor, store=self.store, datasets=self.datasets)
        self.fitting = Fitting(ctx, on_fit=on_fit)
        self.calibrating = Calibrating(ctx, on_calibrate=on_calibrate)
        self.inspection_log = inspection_log(settings)  # this process's segment of the inspection record
        self.inferring = Inferring(ctx, on_infer=on_infer, record=self.inspection_log)
        self.samples = Samples(ctx)
        self.monitoring = Monitoring(ctx)
        self.status = ModelStatus(ctx)
        self._ctx = ctx
        self._alerts = AlertsReader(settings.models_dir)  # /health's calibration alerts, re-read when changed
        self._drift_alarms = DriftStateReader(inspections_dir(settings.models_dir))  # /health's drift warnings
        # The entry points serving, pipelines and benchmarks call are the use cases' own methods (one signature
        # each); only detection_warnings adds to them.
        self.fit_ok = self.fitting.fit_ok  # /fit_ok
        self.fit_images = self.fitting.fit_images  # decoded crops: the pipeline's fit_ok stage
        self.calibrate_from_scores = self.calibrating.from_scores  # /calibrate_ng
        self.calibrate_dataset = self.calibrating.from_dataset  # /calibrate_dataset
        self.calibrate_manual = self.calibrating.manual  # /calibrate_manual
        self.infer = self.inferring.infer  # /infer (then the on_infer hook)
        self.infer_dataset = self.inferring.infer_dataset  # /infer_dataset
        self.score_images = self.inferring.score_images  # scores with no threshold: calibration, evaluation
        self.model = ctx.model  # a stored model scoring with this service's extractor
        self.state = self.status.state  # /state
        self.manifest = self.status.manifest  # /manifest
        self.progress = self.status.progress  # /progress (additive): the running fit's or calibration's
        self.snapshot = self.status.snapshot  # the audit trail's before and after
        self.inspections = self.monitoring.inspections  # GET /inspections
        self.monitor = self.monitoring.drift  # GET /monitor; the drift gauges of /metrics
        self.feedback = self.monitoring.feedback  # POST /feedback

    @classmethod
    def from_settings(cls, settings: Settings, **hooks: Any) -> InspectionService:
        """Build the extractor, give the process its thread budget and attach ``BDI_RUNTIME`` (parity-checked)."""
        configure_threads(settings.intra_op_threads())
        extractor = FeatureExtractor(settings.model.features, cache_dir=settings.weights_cache_dir)
        runtime = attach_runtime(extractor, requested=settings.runtime, root=settings.exports_dir(),
                                 threads=settings.intra_op_threads())
        return cls(settings=settings, extractor=extractor, runtime=runtime, **hooks)

    @property
    def limits(self) -> UploadLimits:
        """The request limits of these settings (the HTTP layer checks uploads with them too)."""
        return self._ctx.limits

    def health(self) -> dict[str, Any]:
        weights = self.extractor.weights
        return {
            "backbone": self.extractor.config.backbone,
            "device": self.extractor.device,
            "cuda_available": cuda_available(),
            "model": weights.name,
            "weights": weights.to_dict(),
            "pretrained": weights.pretrained,
            **self.runtime.health(),
            "runtime_precision_choice": self.precision_choice(),
            "calibration_warnings": self._alerts.read(),
            "warnings": self._drift_alarms.alarms(),
        }

    def precision_choice(self) -> str:
        """Why the feature net runs at its precision: the extractor's rule (``BDI_PRECISION=auto`` reads the device
        and the CPU's native bf16), then whether the reduced precision passed the parity check."""
        asked, running = self.extractor.precision, self.runtime.health()["runtime_precision"]
        if asked == running:
            return self.extractor.precision_reason + ("" if asked == "fp32" else f"; {asked} passed parity")
        return f"{self.extractor.precision_reason}; {asked} not used (parity or speed): {running} runs"

    def detection_warnings(self, *, ref: ModelRef, calib: Calibration) -> tuple[str, ...]:
        """Warnings when the new calibration ``calib`` of ``ref`` detects no NG sample (its threshold is above
        every NG score it knows), logged and shown by ``/health`` until the next calibration
        (``bdi.service.threshold_check``); () when it detects."""
        check = check_detection(self._ctx, ref, calib)
        record_detection(self._ctx, ref, calib, check)
        return check.warnings

    @property
    def on_infer(self) -> InferHook | None:
        """Called after each successful infer (shadow mode): :attr:`Inferring.on_infer`."""
        return self.inferring.on_infer

    @on_infer.setter
    def on_infer(self, hook: InferHook | None) -> None:
        self.inferring.on_infer = hook
