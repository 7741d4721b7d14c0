"""Test-side helpers around the seeded disc generator in ``bdi.data.synthetic``."""

from __future__ import annotations

import cv2
import numpy as np

from bdi.data.synthetic import DiscGeometry, SyntheticDisc, make_disc

__all__ = ["DiscGeometry", "SyntheticDisc", "disc_png", "make_disc", "png_bytes"]


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def disc_png(*, seed: int, size: int = 96, defect: str | None = None) -> bytes:
    """PNG bytes of one seeded disc (good when ``defect`` is None)."""
    return png_bytes(make_disc(size=size, defect=defect, rng=np.random.default_rng(seed)).image)
