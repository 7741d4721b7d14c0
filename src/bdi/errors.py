"""Expected failures of the library, each with a stable ``code``.

The messages carry the substrings the legacy GUI classifies on (docs/contract.md "Error substrings"),
so they must not be reworded casually. Mapping to HTTP lives in ``serving/errors.py`` only.
"""

from __future__ import annotations


class BDIError(Exception):
    """Base class: an expected, user-facing failure."""

    code = "bdi_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInputError(BDIError):
    """The caller sent something unusable (bad image, bad JSON, bad id, bad number)."""

    code = "invalid_input"


class InvalidRecipeError(InvalidInputError):
    """A recipe id that does not match the allowed pattern."""

    code = "invalid_recipe"


class ReservedRecipeError(InvalidRecipeError):
    """The recipe id ``last`` is reserved by the GUI."""

    code = "reserved_recipe"


class InvalidScaleError(InvalidInputError):
    """``mm_per_px`` is not a finite number > 0."""

    code = "invalid_mm_per_px"

    def __init__(self, message: str = "mm_per_px must be > 0 and finite") -> None:
        super().__init__(message)


class ImageDecodeError(InvalidInputError):
    """Bytes that are not a decodable image."""

    code = "image_decode"


class UploadLimitError(InvalidInputError):
    """A request over a configured limit (bytes, pixels, file count, dataset images)."""

    code = "upload_limit"


class TokenGridMismatchError(InvalidInputError):
    """Features whose token grid differs from the memory's grid."""

    code = "token_grid_mismatch"

    def __init__(self, got: tuple[int, int], expected: tuple[int, int]) -> None:
        super().__init__(f"Token grid mismatch: got {tuple(got)}, expected {tuple(expected)}")
        self.got = tuple(got)
        self.expected = tuple(expected)


class NotFittedError(BDIError):
    """No memory (or no index) for the requested model."""

    code = "not_fitted"

    def __init__(self, endpoint: str = "/infer", detail: str = "") -> None:
        message = f"Memoria no encontrada. Ejecuta /fit_ok antes de {endpoint}."
        if detail:
            message = f"{message} ({detail}; model not fitted)"
        super().__init__(message)


class CalibrationMissingError(BDIError):
    """No usable calibration: absent, threshold <= 0, or computed for another memory."""

    code = "calibration_missing"

    def __init__(self, reason: str = "") -> None:
        super().__init__("calibration_missing" if not reason else f"calibration_missing: {reason}")
        self.reason = reason


class InsufficientSamplesError(BDIError):
    """Too few samples to fit or calibrate."""

    code = "insufficient_samples"


class ScaleMismatchError(BDIError):
    """``mm_per_px`` differs from the value locked for the recipe."""

    code = "mm_per_px_mismatch"

    def __init__(self, recipe_id: str, expected: float, got: float) -> None:
        super().__init__(f"mm_per_px mismatch for recipe '{recipe_id}': expected {expected}, got {got}")
        self.expected = expected
        self.got = got


class FitInProgressError(BDIError):
    """Another fit of the same model (any worker process) holds its fit lock."""

    code = "fit_in_progress"

class RegistryManagedError(BDIError):
    """An API fit or calibration of a model that a registry alias manages (the conflict rule)."""

    code = "registry_managed"


class CrossRecipeDeleteError(BDIError):
    """A dataset delete that the read fallback would take to another recipe's samples (refused by default)."""

    code = "cross_recipe_delete"


class NotFoundError(BDIError):
    """A dataset file or sidecar that does not exist."""

    code = "not_found"


class WeightsError(BDIError):
    """Backbone weights that cannot be loaded (missing file, bad hash, offline)."""

    code = "weights"


class DeviceError(BDIError):
    """The configured device or precision cannot run here (CUDA requested without CUDA, fp16 on the CPU)."""

    code = "device"


class StorageError(BDIError):
    """The model store could not be read or written."""

    code = "storage"


class ModelMismatchError(BDIError):
    """A stored memory whose features come from another backbone, blocks, size or weights than this
    extractor's: its distances would be meaningless, so it is refused instead of scored."""

    code = "model_mismatch"


class ExportError(BDIError):
    """A feature net that cannot be exported, an export folder that is incomplete or corrupt, or a runtime
    that cannot run it (not installed, failed to load)."""

    code = "export"
