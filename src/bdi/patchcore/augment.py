"""Memory augmentation at fit, its one home: each good image, its rotations about the centre by 360°·k/n
(``MemoryConfig.fit_rotations``) and their flips / 90° rotations (``MemoryConfig.augment``).

As AnomalyDINO does with few references, the memory then holds the patches of the dihedral copies of every
good image, so a texture or a disc seen at another orientation is not scored as anomalous. The copies turn about
the image centre: for an annulus ROI centred on the image (a brake disc crop) that is the disc centre. A rotation
by 90° swaps width and height; the letterbox (``bdi.patchcore.imaging``) takes any shape. An image seen through
a polar view (``bdi.patchcore.polar``) is its unwrapped strip, and a rotation turns the strip (a shift along it, exact).
The copies are fixed transforms, not random draws: the same images give the same memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import cv2
import numpy as np

from bdi.config import Augmentation
from bdi.patchcore.polar import PolarView

Transform = Callable[[np.ndarray], np.ndarray]


def _rot(k: int) -> Transform:
    return lambda image: np.ascontiguousarray(np.rot90(image, k=k, axes=(0, 1)))


def _flip(axis: int) -> Transform:
    return lambda image: np.ascontiguousarray(np.flip(image, axis=axis))


def _identity(image: np.ndarray) -> np.ndarray:
    return image


def _transpose(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(image, 0, 1))


def _anti_transpose(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(np.swapaxes(image, 0, 1), k=2, axes=(0, 1)))


# per mode, the transforms applied to each image, the identity first (the original image)
TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "none": (_identity,),
    "flips": (_identity, _flip(1), _flip(0), _rot(2)),  # horizontal, vertical, both (= a 180° turn)
    "rot90": (_identity, _rot(1), _rot(2), _rot(3)),
    "dihedral": (_identity, _rot(1), _rot(2), _rot(3), _flip(1), _flip(0), _transpose, _anti_transpose),
}


def copies(mode: Augmentation, rotations: int = 1) -> int:
    """How many images the fit encodes per good image (1 for ``"none"`` and one rotation)."""
    return len(TRANSFORMS[mode]) * rotations


ViewOf = Callable[[int, np.ndarray], PolarView | None]  # (image's position, image) → its polar view, or None


def augmented(images: Iterable[np.ndarray], mode: Augmentation, rotations: int = 1,
              view_of: ViewOf | None = None) -> Iterator[np.ndarray]:
    """Each ``(H, W, C)`` image, its ``rotations - 1`` rotated copies (:func:`rotated_copies`) and each one's
    :data:`TRANSFORMS` copies, lazily, image by image. An image that ``view_of`` gives a polar view is seen as its
    unwrapped strip, turned by 1/``rotations`` of a revolution per copy."""
    transforms = TRANSFORMS[mode]
    for i, image in enumerate(images):
        view = view_of(i, image) if view_of is not None else None
        if view is not None:
            turns = [view.unwrap(image, turn=k / rotations) for k in range(rotations)]
        else:
            turns = rotated_copies(image, rotations) if rotations > 1 else [image]
        for turned in turns:
            for transform in transforms:
                yield transform(turned)


def rotated_copies(image: np.ndarray, n: int) -> list[np.ndarray]:
    """``image`` and its ``n - 1`` rotations about its centre by 360°·k/n, each the same shape and dtype.

    Pixels that a rotation brings in from outside the image are mirrored in (``BORDER_REFLECT_101``), so no
    artificial black corner appears; bilinear interpolation. ``n = 1`` gives ``[image]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    h, w = image.shape[:2]
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    copies = [image]
    for k in range(1, n):
        matrix = cv2.getRotationMatrix2D(centre, 360.0 * k / n, 1.0)
        copies.append(cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT_101))
    return copies

