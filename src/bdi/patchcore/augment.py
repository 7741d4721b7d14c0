"""Memory augmentation at fit: each good image and its flips / 90° rotations (``MemoryConfig.augment``).

As AnomalyDINO does with few references, the memory then holds the patches of the dihedral copies of every
good image, so a texture or a disc seen at another orientation is not scored as anomalous. The copies turn about
the image centre: for an annulus ROI centred on the image (a brake disc crop) that is the disc centre. A rotation
by 90° swaps width and height; the letterbox (``bdi.patchcore.imaging``) takes any shape. The copies are fixed
transforms, not random draws: the same images give the same memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from bdi.config import Augmentation

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


def copies(mode: Augmentation) -> int:
    """How many images the fit encodes per good image (1 for ``"none"``)."""
    return len(TRANSFORMS[mode])


def augmented(images: Iterable[np.ndarray], mode: Augmentation) -> Iterator[np.ndarray]:
    """Each ``(H, W, C)`` image followed by its copies (:data:`TRANSFORMS`), lazily, image by image."""
    transforms = TRANSFORMS[mode]
    for image in images:
        for transform in transforms:
            yield transform(image)
