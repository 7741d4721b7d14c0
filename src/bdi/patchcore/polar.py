"""Annulus ROIs unwrapped into strips (``MemoryConfig.unwrap = "annulus"``): the one home of the polar view.

A narrow annulus (a brake disc's friction ring or vent band) fills little of its bounding square, and a turn of
the disc moves every defect. Unwrapped about the annulus's centre (radius down, angle across, ``UPSAMPLE`` strip
px per crop px) it is a long band; folded into equal rows until about square, it fills the network's input, and
a turn of the disc becomes a shift along the band. The strip's anomaly map is warped back onto the crop, so the
heatmap and the regions (and their areas in mm²) are in crop pixels, as for any other model.

Near the centre a polar warp spreads few pixels over many columns, so an annulus whose hole is smaller than
``MIN_INNER_RATIO`` of its radius (a hub with a small bore) is seen as a crop (:func:`polar_view` gives None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import cv2
import numpy as np

from bdi.errors import InvalidInputError
from bdi.patchcore.imaging import Annulus, annulus_of

UPSAMPLE = 2.5  # strip px per crop px, radially and along the annulus's middle circle
MARGIN_PX = 2.0  # the polar warp reaches this far beyond the outer radius (then cut to the annulus)
MIN_INNER_RATIO = 0.5  # r_inner / r below which an annulus is seen as a crop


@dataclass(frozen=True)
class PolarView:
    """How one crop's annulus is unwrapped into a folded strip, and the strip's map warped back.

    The band has ``band_height`` rows (radius) and ``n_angles = rows · width`` columns (angle); the strip is the
    band cut into ``rows`` pieces of ``width`` columns stacked top to bottom, so no angle is lost.
    """

    annulus: Annulus
    crop_height: int
    crop_width: int
    upsample: float = UPSAMPLE

    def __post_init__(self) -> None:
        if self.band_height < 1:
            raise InvalidInputError(
                f"the annulus r_inner={self.annulus.r_inner:g}, r={self.annulus.r:g} is too thin to unwrap")

    @property
    def r_max(self) -> float:
        return self.annulus.r + MARGIN_PX

    @cached_property
    def n_radial(self) -> int:
        return int(round(self.r_max * self.upsample))

    @cached_property
    def top(self) -> int:
        return int(self.annulus.r_inner / self.r_max * self.n_radial)

    @cached_property
    def band_height(self) -> int:
        return int(math.ceil(self.annulus.r / self.r_max * self.n_radial)) - self.top

    @cached_property
    def rows(self) -> int:
        """Pieces the band is cut into so that the strip is about square."""
        return max(1, int(round(math.sqrt(self._length / max(self.band_height, 1)))))

    @cached_property
    def width(self) -> int:
        return int(math.ceil(self._length / self.rows))

    @property
    def n_angles(self) -> int:
        return self.rows * self.width

    @property
    def _length(self) -> float:
        """The band's length in strip px: the annulus's middle circle, upsampled."""
        return math.pi * (self.annulus.r_inner + self.annulus.r) * self.upsample

    def band(self, image: np.ndarray, *, turn: float = 0.0, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """The annulus unwrapped, ``(band_height, n_angles[, C])``, turned by ``turn`` of a revolution (a shift)."""
        polar = cv2.warpPolar(image, (self.n_radial, self.n_angles), (self.annulus.cx, self.annulus.cy),
                              self.r_max, interpolation + cv2.WARP_POLAR_LINEAR)
        band = np.swapaxes(polar[:, self.top:self.top + self.band_height], 0, 1)
        shift = int(round(turn * self.n_angles)) % self.n_angles
        return np.ascontiguousarray(np.roll(band, -shift, axis=1) if shift else band)

    def fold(self, band: np.ndarray) -> np.ndarray:
        """The band cut into ``rows`` pieces stacked top to bottom: ``(rows · band_height, width[, C])``."""
        pieces = [band[:, i * self.width:(i + 1) * self.width] for i in range(self.rows)]
        return np.ascontiguousarray(np.concatenate(pieces, axis=0))

    def unfold(self, strip: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`fold`."""
        pieces = [strip[i * self.band_height:(i + 1) * self.band_height] for i in range(self.rows)]
        return np.ascontiguousarray(np.concatenate(pieces, axis=1))

    def unwrap(self, image: np.ndarray, *, turn: float = 0.0, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """What the model sees of the crop: its annulus's band, folded (:meth:`band`, :meth:`fold`)."""
        return self.fold(self.band(image, turn=turn, interpolation=interpolation))

    def wrap_back(self, strip_map: np.ndarray) -> np.ndarray:
        """A strip's ``(rows · band_height, width)`` map warped onto the crop: ``(crop_height, crop_width)``
        float32; outside the annulus it repeats the band's edge (the ROI mask leaves it out)."""
        band = self.unfold(strip_map.astype(np.float32, copy=False))
        wrapped = np.concatenate([band, band[:, :1]], axis=1)  # the angle wraps around: no seam at 0°
        map_x, map_y = self._crop_to_band
        return cv2.remap(wrapped, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    @cached_property
    def _crop_to_band(self) -> tuple[np.ndarray, np.ndarray]:
        """For each crop pixel, its (column, row) in the band, as cv2.warpPolar places them."""
        ys, xs = np.mgrid[0:self.crop_height, 0:self.crop_width].astype(np.float32)
        dx, dy = xs - np.float32(self.annulus.cx), ys - np.float32(self.annulus.cy)
        angle = np.mod(np.arctan2(dy, dx), 2 * np.pi)
        column = (angle * (self.n_angles / (2 * np.pi))).astype(np.float32)
        row = (np.hypot(dx, dy) * (self.n_radial / self.r_max) - self.top).astype(np.float32)
        return column, row


def polar_view(shape: Mapping[str, Any] | None, *, width: int, height: int) -> PolarView | None:
    """The polar view of a ``width``×``height`` crop with ROI ``shape``: None unless the shape is an annulus whose
    hole is at least ``MIN_INNER_RATIO`` of its radius."""
    annulus = annulus_of(shape, width=width, height=height)
    if annulus is None or annulus.r <= 0 or annulus.r_inner < MIN_INNER_RATIO * annulus.r:
        return None
    return PolarView(annulus=annulus, crop_height=height, crop_width=width)


# what a model was fitted on (its memory's metadata["view"]): crops, or annuli unwrapped; a memory without it saw crops
VIEW_CROP, VIEW_POLAR = "crop", "polar"


class FitViews:
    """The polar view of each image of a fit, from its ROI shape (``view_of`` of ``bdi.patchcore.augment``): every
    image unwrapped, or none, since a model sees one kind of input; ``kind`` is what the fit saw."""

    def __init__(self, shapes: Sequence[Mapping[str, Any] | None]) -> None:
        self._shapes = shapes
        self.kind: str | None = None

    def __call__(self, position: int, image: np.ndarray) -> PolarView | None:
        view = polar_view(self._shapes[position], width=image.shape[1], height=image.shape[0])
        kind = VIEW_CROP if view is None else VIEW_POLAR
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise InvalidInputError(
                f"with memory.unwrap=annulus the fit's samples must all have an annulus ROI with r_inner >= "
                f"{MIN_INNER_RATIO:g} r, or none: sample {position + 1} is a {kind}, the first was a {self.kind}")
        return view
