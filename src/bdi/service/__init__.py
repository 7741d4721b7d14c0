"""Use cases: the only API that ``serving/`` and ``pipelines/`` call.

:class:`InspectionService` holds one use-case object per job over a shared :class:`ServiceContext`:
``fitting`` (:mod:`.fitting`), ``calibrating`` (:mod:`.calibrating`), ``inferring`` (:mod:`.inferring`),
``samples`` (:mod:`.samples`, the ``/datasets/*`` folders) and ``status`` (:mod:`.status`); request limits are
checked by :class:`UploadLimits` (:mod:`.limits`) and results are the types of :mod:`.results`.
"""

from bdi.monitoring.drift import RoiDrift, metrics_rows
from bdi.monitoring.feedback import CorrectedRegion, Feedback
from bdi.monitoring.record import InspectionPage, InspectionQuery, InspectionRecord
from bdi.patchcore.calibration import Calibration
from bdi.patchcore.inference import Region
from bdi.service.calibrating import CALIBRATE_NG_DEFAULT_MM_PER_PX, Calibrating
from bdi.service.context import ServiceContext
from bdi.service.feedback import FeedbackRequest
from bdi.service.fitting import Fitting
from bdi.service.inferring import Inferring
from bdi.service.inspection import InspectionService, remove_orphan_files
from bdi.service.limits import UploadLimits
from bdi.service.results import (
    FitResult,
    InferOutcome,
    ManualCalibration,
    ModelManifest,
    ModelSnapshot,
    ModelState,
    SampleScore,
)
from bdi.service.samples import Samples
from bdi.service.status import ModelStatus
from bdi.storage.datasets import LABELS

# The HTTP layer shapes its responses from these types and imports them from here, never from the layers below.
__all__ = ["CALIBRATE_NG_DEFAULT_MM_PER_PX", "LABELS", "Calibrating", "Calibration", "CorrectedRegion", "Feedback",
           "FeedbackRequest", "FitResult", "Fitting",
           "InferOutcome", "Inferring", "InspectionPage", "InspectionQuery", "InspectionRecord",
           "InspectionService", "ManualCalibration", "ModelManifest", "ModelSnapshot", "ModelState",
           "ModelStatus", "Region", "RoiDrift",
           "SampleScore", "Samples",
           "ServiceContext", "UploadLimits", "metrics_rows", "remove_orphan_files"]
