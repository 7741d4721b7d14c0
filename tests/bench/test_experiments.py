"""bench.experiments' memory augmentation: each good image and its three flips/turns, same shape, nothing else."""

from __future__ import annotations

import numpy as np

from bench.experiments import VARIANTS, flips


def test_flips_give_each_image_its_mirror_images_and_half_turn() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # non-square: a 90° turn would change the shape
    out = flips([image])
    assert len(out) == 4 and all(o.shape == image.shape for o in out)
    assert np.array_equal(out[0], image)
    assert np.array_equal(out[1], image[:, ::-1]) and np.array_equal(out[2], image[::-1])
    assert np.array_equal(out[3], np.rot90(image, 2))
    assert len(VARIANTS["default"]([image, image])) == 2
