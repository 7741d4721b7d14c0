"""Memory augmentation: each good image and its flips / 90° rotations, about the image centre."""

from __future__ import annotations

import numpy as np
import pytest

from bdi.patchcore.augment import augmented, copies


def _image() -> np.ndarray:
    return np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)  # asymmetric: every copy differs


@pytest.mark.parametrize(("mode", "n"), [("none", 1), ("flips", 4), ("rot90", 4), ("dihedral", 8)])
def test_each_image_is_followed_by_its_copies_the_original_first(mode: str, n: int) -> None:
    image = _image()
    out = list(augmented([image, image + 1], mode))  # type: ignore[arg-type]
    assert copies(mode) == n  # type: ignore[arg-type]
    assert len(out) == 2 * n
    assert np.array_equal(out[0], image) and np.array_equal(out[n], image + 1)
    assert len({o.tobytes() + bytes(o.shape) for o in out[:n]}) == n  # n distinct copies


def test_flips_and_rotations_turn_about_the_image_centre() -> None:
    image = _image()
    _, h, v, both = augmented([image], "flips")
    assert np.array_equal(h, image[:, ::-1]) and np.array_equal(v, image[::-1])
    assert np.array_equal(both, image[::-1, ::-1])
    _, r90, r180, r270 = augmented([image], "rot90")
    assert r90.shape == r270.shape == (5, 3, 3)  # a quarter turn swaps width and height
    assert np.array_equal(np.rot90(r90), r180) and np.array_equal(np.rot90(r180, 2), image)


def test_the_copies_are_the_same_every_time() -> None:
    first = [o.copy() for o in augmented([_image()], "dihedral")]
    again = list(augmented([_image()], "dihedral"))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
