"""The polar view (``bdi.patchcore.polar``): a narrow annulus unwrapped into a folded strip, and a strip's map
warped back onto the crop."""

from __future__ import annotations

import numpy as np
import pytest

from bdi.data.disc_scenes import make_hard_disc
from bdi.errors import InvalidInputError
from bdi.patchcore.augment import rotated_copies
from bdi.patchcore.imaging import build_roi_mask
from bdi.patchcore.polar import MIN_INNER_RATIO, UPSAMPLE, FitViews, PolarView, polar_view

RING = {"kind": "annulus", "cx": 63.5, "cy": 63.5, "r": 60, "r_inner": 40}


def _view(shape: dict[str, object], size: int = 128) -> PolarView:
    view = polar_view(shape, width=size, height=size)
    assert view is not None
    return view


@pytest.mark.parametrize("roi", ["ring", "vents"])
def test_the_strip_is_the_annulus_folded_about_square_and_keeps_every_angle(roi: str) -> None:
    disc = make_hard_disc(size=256, defect="pit", roi=roi, rng=np.random.default_rng(4))
    crop = disc.roi_crop(roi)
    height, width = crop.image.shape[:2]
    view = polar_view(crop.shape, width=width, height=height)
    assert view is not None
    strip = view.unwrap(crop.image)
    assert 0.5 < strip.shape[0] / strip.shape[1] < 2.0 and strip.shape[2] == 3
    inside = view.unwrap(build_roi_mask(crop.shape, width=width, height=height))
    assert (inside > 0).mean() > 0.97  # the strip is the annulus (a pixel row at each edge may fall outside)
    assert (view.unwrap(crop.mask) > 0).any()  # the defect is in the strip
    band = view.band(crop.image)
    annulus = view.annulus
    assert band.shape[1] >= np.pi * (annulus.r_inner + annulus.r) * UPSAMPLE  # a sample per strip px of the middle
    assert np.array_equal(view.unfold(view.fold(band)), band)  # folding drops no angle
    assert strip.size == band.size


def test_a_map_warped_back_lands_on_the_crop_where_it_came_from() -> None:
    view = _view(RING)
    ys, xs = np.mgrid[0:128, 0:128].astype(np.float32)
    smooth = (np.sin(xs / 9.0) + np.cos(ys / 7.0)).astype(np.float32)
    inside = build_roi_mask(RING, width=128, height=128) == 255
    back = view.wrap_back(view.unwrap(smooth))
    assert back.shape == (128, 128) and back.dtype == np.float32
    assert np.abs(back - smooth)[inside].mean() < 0.01
    spot = np.zeros((128, 128), np.float32)
    spot[14:18, 60:64] = 1.0  # on the ring, at 12 o'clock
    back = view.wrap_back(view.unwrap(spot))
    assert np.unravel_index(int(back.argmax()), back.shape) in {(y, x) for y in range(13, 19) for x in range(59, 65)}
    seam = np.zeros((128, 128), np.float32)
    seam[58:70, 110:124] = 1.0  # across 0°, where the band's ends meet
    back = view.wrap_back(view.unwrap(seam))
    assert back[63, 112:122].min() > 0.9  # no seam at 0°


def test_a_turn_of_the_disc_is_a_shift_along_the_band() -> None:
    ys, xs = np.mgrid[0:128, 0:128].astype(np.float32)
    angle, radius = np.arctan2(ys - 63.5, xs - 63.5), np.hypot(ys - 63.5, xs - 63.5)
    grey = (128 + 60 * np.sin(angle + radius / 6) * np.cos(2 * angle)).astype(np.uint8)  # no symmetry of a turn
    image = np.dstack([grey] * 3)
    view = _view(RING)  # about the crop's centre, which rotated_copies turns about
    turned = view.band(rotated_copies(image, 4)[1]).astype(float)  # the fit's copy turned by a quarter
    for turn in (0.0, 0.5, 0.75):
        assert np.abs(view.band(image, turn=turn).astype(float) - turned).mean() > 10, turn
    assert np.abs(view.band(image, turn=0.25).astype(float) - turned).mean() < 0.5  # the same quarter turn


@pytest.mark.parametrize("shape", [
    None, {"kind": "rect"}, {"kind": "circle", "r": 60},
    {"kind": "annulus", "cx": 64, "cy": 64, "r": 60, "r_inner": 60 * MIN_INNER_RATIO - 1},  # a hub's small bore
])
def test_other_shapes_and_a_small_bore_annulus_are_seen_as_crops(shape: dict[str, object] | None) -> None:
    assert polar_view(shape, width=128, height=128) is None


def test_an_annulus_too_thin_to_unwrap_is_refused_clearly() -> None:
    with pytest.raises(InvalidInputError, match="too thin"):
        polar_view({"kind": "annulus", "r": 40, "r_inner": 40.1}, width=128, height=128)


def test_a_fit_sees_strips_or_crops_never_both() -> None:
    image = np.zeros((128, 128, 3), np.uint8)
    views = FitViews([RING, RING, None])
    assert views(0, image) is not None and views(1, image) is not None and views.kind == "polar"
    with pytest.raises(InvalidInputError, match="sample 3 is a crop, the first was a polar"):
        views(2, image)
