"""Seeded synthetic brake-disc images for tests, demos and smoke benchmarks.

A disc is a grey annulus with concentric machining marks, mild radial shading and sensor noise.
Defects (a dark pit, a bright scratch or a dark crack) are painted on the friction ring and come
with their exact binary mask. Every random choice comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECT_KINDS = ("pit", "scratch", "crack")


@dataclass(frozen=True)
class DiscGeometry:
    """Where the friction ring lies in an image of ``size``×``size`` px."""

    size: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.size / 2.0, self.size / 2.0)

    @property
    def r_outer(self) -> float:
        return self.size * 0.46

    @property
    def r_inner(self) -> float:
        return self.size * 0.22

    def annulus_shape(self) -> dict[str, float | str]:
        """The ``shape`` JSON object the GUI would send for this ring (docs/contract.md "ROI mask")."""
        cx, cy = self.centre
        return {"kind": "annulus", "cx": cx, "cy": cy, "r": self.r_outer, "r_inner": self.r_inner}


@dataclass(frozen=True)
class SyntheticDisc:
    image: np.ndarray  # (size, size, 3) uint8 BGR
    mask: np.ndarray  # (size, size) uint8, 255 on the defect, 0 elsewhere
    defect: str | None  # None for a good disc


def _disc_background(geometry: DiscGeometry, rng: np.random.Generator) -> np.ndarray:
    size = geometry.size
    cx, cy = geometry.centre
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = np.hypot(xx - cx, yy - cy)
    angle = np.arctan2(yy - cy, xx - cx)
    groove_period = size / rng.uniform(28.0, 34.0)
    phase = rng.uniform(0, 2 * np.pi)
    grooves = 0.5 + 0.5 * np.sin(2 * np.pi * radius / groove_period + phase)
    shading = 0.08 * np.cos(angle - rng.uniform(0, 2 * np.pi))
    base = 120.0 + 40.0 * grooves * 0.35 + 255.0 * shading * 0.3
    base += rng.normal(0.0, 3.0, size=(size, size))
    ring = (radius <= geometry.r_outer) & (radius >= geometry.r_inner)
    hub = radius < geometry.r_inner
    img = np.full((size, size), 35.0, dtype=np.float32)  # background
    img[ring] = base[ring]
    img[hub] = 80.0 + base[hub] * 0.2
    return img


def _paint_defect(
    img: np.ndarray, geometry: DiscGeometry, kind: str, rng: np.random.Generator
) -> np.ndarray:
    size = geometry.size
    cx, cy = geometry.centre
    mask: np.ndarray = np.zeros((size, size), dtype=np.uint8)
    r = rng.uniform(geometry.r_inner + 0.2 * (geometry.r_outer - geometry.r_inner),
                    geometry.r_outer - 0.2 * (geometry.r_outer - geometry.r_inner))
    theta = rng.uniform(0, 2 * np.pi)
    px, py = int(round(cx + r * np.cos(theta))), int(round(cy + r * np.sin(theta)))
    scale = max(1, size // 64)
    if kind == "pit":
        cv2.circle(mask, (px, py), max(2, int(round(size * rng.uniform(0.035, 0.05)))), 255, thickness=-1)
        value = 20.0
    elif kind == "scratch":
        length = rng.uniform(0.15, 0.25) * size
        direction = rng.uniform(0, np.pi)
        dx, dy = np.cos(direction) * length / 2, np.sin(direction) * length / 2
        cv2.line(mask, (int(px - dx), int(py - dy)), (int(px + dx), int(py + dy)), 255, thickness=2 * scale)
        value = 250.0
    elif kind == "crack":
        points = [(px, py)]
        for _ in range(6):
            last = points[-1]
            step = rng.normal(0, 1, 2) * 3 * scale + np.array([2 * scale, 0])
            points.append((int(last[0] + step[0]), int(last[1] + step[1])))
        cv2.polylines(mask, [np.array(points, dtype=np.int32)], False, 255, thickness=max(1, scale))
        value = 10.0
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    ring = np.zeros_like(mask)
    cv2.circle(ring, (int(cx), int(cy)), int(geometry.r_outer), 255, thickness=-1)
    cv2.circle(ring, (int(cx), int(cy)), int(np.ceil(geometry.r_inner)), 0, thickness=-1)
    mask = cv2.bitwise_and(mask, ring)
    img[mask > 0] = value
    return mask


def make_disc(
    *, size: int = 128, defect: str | None = None, rng: np.random.Generator
) -> SyntheticDisc:
    """One disc image; ``defect`` in DEFECT_KINDS paints that defect and returns its mask."""
    geometry = DiscGeometry(size)
    img = _disc_background(geometry, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    if defect is not None:
        mask = _paint_defect(img, geometry, defect, rng)
    gray = np.clip(img, 0, 255).astype(np.uint8)
    return SyntheticDisc(image=cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), mask=mask, defect=defect)


def write_mvtec_dataset(
    root: Path,
    *,
    n_train: int = 12,
    n_test_good: int = 4,
    n_test_per_defect: int = 2,
    size: int = 128,
    seed: int = 0,
    defects: tuple[str, ...] = DEFECT_KINDS,
) -> Path:
    """Write a synthetic disc dataset in MVTec layout under ``root`` and return it.

    Layout: train/good/*.png, test/good/*.png, test/<defect>/*.png, ground_truth/<defect>/<stem>_mask.png.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)

    def write(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), image):
            raise OSError(f"could not write {path}")

    for i in range(n_train):
        write(root / "train" / "good" / f"{i:03d}.png", make_disc(size=size, rng=rng).image)
    for i in range(n_test_good):
        write(root / "test" / "good" / f"{i:03d}.png", make_disc(size=size, rng=rng).image)
    for kind in defects:
        for i in range(n_test_per_defect):
            disc = make_disc(size=size, defect=kind, rng=rng)
            write(root / "test" / kind / f"{i:03d}.png", disc.image)
            write(root / "ground_truth" / kind / f"{i:03d}_mask.png", disc.mask)
    return root
