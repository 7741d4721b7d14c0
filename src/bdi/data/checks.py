"""The checks that make an image file usable for training or evaluation (:func:`check_sample`): decodable,
allowed channels, large enough, a valid scale, and a ground-truth mask of the same size."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bdi.errors import BDIError, InvalidInputError
from bdi.patchcore.imaging import channel_count, decode_image, decode_mask, validate_mm_per_px


@dataclass(frozen=True)
class SampleLimits:
    """What a training/evaluation image may be: its pixel count, channel counts and shortest side."""

    max_pixels: int | None
    channels: tuple[int, ...]
    min_size: int


@dataclass(frozen=True)
class SampleFacts:
    width: int
    height: int
    sha256: str


def check_sample(path: Path, *, mask_path: Path | None, mm_per_px: object, limits: SampleLimits) -> SampleFacts:
    """The facts of a usable image file (with its optional ground-truth mask), else an
    :class:`InvalidInputError` whose message is the reason, starting with what failed: ``unreadable``,
    ``corrupt image``, ``channels``, ``too small``, ``bad mm_per_px``, ``mask unreadable``, ``corrupt mask``
    or ``image/mask size mismatch``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"unreadable: {exc.strerror or exc}") from exc
    try:
        image = decode_image(data, max_pixels=limits.max_pixels, name=path.name)
    except BDIError as exc:
        raise InvalidInputError(f"corrupt image: cannot be decoded ({exc})") from exc
    channels = channel_count(data)
    if channels is not None and channels not in limits.channels:
        raise InvalidInputError(f"channels: {channels} channels, allowed are {list(limits.channels)}")
    height, width = image.shape[:2]
    if min(height, width) < limits.min_size:
        raise InvalidInputError(f"too small: {width}x{height} px, the shortest side must be {limits.min_size}")
    try:
        validate_mm_per_px(mm_per_px)
    except BDIError as exc:
        raise InvalidInputError(f"bad mm_per_px: {mm_per_px!r} ({exc})") from exc
    if mask_path is not None:
        try:
            mask = decode_mask(mask_path.read_bytes(), max_pixels=limits.max_pixels, name=str(mask_path))
        except OSError as exc:
            raise InvalidInputError(f"mask unreadable: {mask_path}: {exc.strerror or exc}") from exc
        except BDIError as exc:
            raise InvalidInputError(f"corrupt mask: {mask_path} cannot be decoded") from exc
        if mask.shape[:2] != (height, width):
            raise InvalidInputError(f"image/mask size mismatch: image is {width}x{height} px, mask "
                                    f"{mask_path.name} is {mask.shape[1]}x{mask.shape[0]} px")
    return SampleFacts(width=width, height=height, sha256=hashlib.sha256(data).hexdigest())
