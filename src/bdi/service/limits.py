"""The request limits (``BDI_MAX_*``), checked in one place: the library's use cases and the HTTP layer's
upload reader both call :class:`UploadLimits`, so each limit has one message (the GUI matches it)."""

from __future__ import annotations

from dataclasses import dataclass

from bdi.config import Settings
from bdi.errors import UploadLimitError


@dataclass(frozen=True)
class UploadLimits:
    """How much one request may bring or make the server read."""

    max_files_per_request: int
    max_upload_bytes: int  # per file
    max_dataset_images: int  # stored samples one dataset-driven request may read
    max_image_pixels: int  # per decoded image (checked by the decoder)

    @classmethod
    def of(cls, settings: Settings) -> UploadLimits:
        return cls(max_files_per_request=settings.max_files_per_request, max_upload_bytes=settings.max_upload_bytes,
                   max_dataset_images=settings.max_dataset_images, max_image_pixels=settings.max_image_pixels)

    def check_file_count(self, n_files: int) -> None:
        """UploadLimitError when one request brings more than ``BDI_MAX_FILES_PER_REQUEST`` files."""
        if n_files > self.max_files_per_request:
            raise UploadLimitError(
                f"{n_files} files exceed the limit of {self.max_files_per_request} per request "
                "(BDI_MAX_FILES_PER_REQUEST)"
            )

    def check_file_size(self, n_bytes: int, *, name: str, truncated: bool = False) -> None:
        """UploadLimitError when file ``name`` has more than ``BDI_MAX_UPLOAD_BYTES``; ``truncated``: only
        ``max_upload_bytes + 1`` bytes were read, so its size is known as "more than" the limit."""
        limit = self.max_upload_bytes
        if n_bytes > limit:
            size = f"more than {limit}" if truncated else str(n_bytes)
            raise UploadLimitError(f"{name}: {size} bytes exceeds the limit of {limit} bytes (BDI_MAX_UPLOAD_BYTES)")

    def check_dataset_size(self, n_images: int) -> None:
        """UploadLimitError when a dataset-driven request would read more than ``BDI_MAX_DATASET_IMAGES`` samples."""
        limit = self.max_dataset_images
        if n_images > limit:
            raise UploadLimitError(
                f"{n_images} dataset images exceed the limit of {limit} per request (BDI_MAX_DATASET_IMAGES)"
            )
