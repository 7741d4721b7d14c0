"""Cheap statistics of one crop, recorded with each inspection and stored as the calibration's reference:
mean brightness, contrast (standard deviation) and sharpness (variance of the Laplacian), all of a grayscale copy
downscaled to at most :data:`STATS_MAX_SIDE` px so that they cost well under a millisecond per crop."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

STATS_MAX_SIDE = 128  # the long side of the copy the statistics are computed on (px)
STAT_NAMES: tuple[str, ...] = ("brightness", "contrast", "sharpness")


@dataclass(frozen=True)
class ImageStats:
    """``brightness``: mean gray level (0-255); ``contrast``: its standard deviation; ``sharpness``: the variance of
    the Laplacian of the downscaled copy (a blurred image has a lower one)."""

    brightness: float
    contrast: float
    sharpness: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def gray_thumbnail(image: np.ndarray, *, max_side: int = STATS_MAX_SIDE) -> np.ndarray:
    """``image`` (BGR/BGRA uint8 (H, W, C) or gray (H, W)) as gray uint8 whose long side is at most ``max_side``."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    height, width = gray.shape[:2]
    scale = max_side / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(gray)


def image_stats(image: np.ndarray) -> ImageStats:
    """The statistics of one decoded crop (see :class:`ImageStats`)."""
    gray = gray_thumbnail(image)
    mean, std = cv2.meanStdDev(gray)
    laplacian = cv2.Laplacian(gray, cv2.CV_64F)
    return ImageStats(brightness=float(mean[0][0]), contrast=float(std[0][0]), sharpness=float(laplacian.var()))
