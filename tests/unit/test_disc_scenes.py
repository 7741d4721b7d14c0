"""The hard disc generator (bdi.data.disc_scenes): seeded, exact masks, defects where they were asked for."""

from __future__ import annotations

import numpy as np
import pytest

from bdi.data.disc_scenes import HARD_DEFECT_KINDS, ROIS, draw_disc, make_hard_disc
from bdi.patchcore.imaging import build_roi_mask

SIZE = 128


def _roi_mask(disc_shape: dict[str, float | str]) -> np.ndarray:
    return build_roi_mask(disc_shape, width=SIZE, height=SIZE) > 0


def test_the_same_seed_draws_the_same_defective_disc() -> None:
    a = make_hard_disc(size=SIZE, defect="crack", roi="hub", rng=np.random.default_rng(7))
    b = make_hard_disc(size=SIZE, defect="crack", roi="hub", rng=np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.scene == b.scene and a.defect == b.defect


def test_successive_discs_differ_in_pose_and_light() -> None:
    rng = np.random.default_rng(0)
    scenes = [make_hard_disc(size=SIZE, rng=rng).scene for _ in range(4)]
    assert len({(s.layout.cx, s.layout.cy) for s in scenes}) == 4
    assert len({s.layout.r_outer for s in scenes}) == 4
    assert len({s.light_angle_rad for s in scenes}) == 4


def test_a_good_disc_has_an_empty_mask() -> None:
    disc = make_hard_disc(size=SIZE, rng=np.random.default_rng(1))
    assert disc.defect is None and not disc.mask.any()


@pytest.mark.parametrize("kind", HARD_DEFECT_KINDS)
def test_the_mask_is_exactly_the_pixels_the_defect_changed(kind: str) -> None:
    disc = make_hard_disc(size=SIZE, defect=kind, roi="hub", rng=np.random.default_rng(3))
    clean = draw_disc(disc.scene)
    changed = np.any(disc.image != clean.image, axis=2)
    assert changed.any()
    assert np.array_equal(changed, disc.mask > 0)


@pytest.mark.parametrize("roi", ROIS)
def test_defects_land_inside_the_requested_roi_and_no_other(roi: str) -> None:
    rng = np.random.default_rng(11)
    for kind in HARD_DEFECT_KINDS:
        disc = make_hard_disc(size=SIZE, defect=kind, roi=roi, rng=rng)
        defect = disc.mask > 0
        assert defect.any()
        assert not (defect & ~_roi_mask(disc.roi_shape(roi))).any(), kind
        for other in ROIS:
            if other != roi:
                assert not (defect & _roi_mask(disc.roi_shape(other))).any(), (kind, other)


def test_roi_shapes_are_annuli_about_the_discs_centre() -> None:
    disc = make_hard_disc(size=SIZE, rng=np.random.default_rng(2))
    layout = disc.scene.layout
    for roi in ROIS:
        shape = disc.roi_shape(roi)
        assert shape["kind"] == "annulus" and (shape["cx"], shape["cy"]) == (layout.cx, layout.cy)
        assert 0 < float(shape["r_inner"]) < float(shape["r"]) <= layout.r_outer


def test_an_unknown_roi_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ROI"):
        make_hard_disc(size=SIZE, defect="pit", roi="caliper", rng=np.random.default_rng(0))


@pytest.mark.parametrize("roi", ROIS)
def test_an_roi_crop_holds_the_whole_roi_with_its_shape_in_crop_coordinates(roi: str) -> None:
    disc = make_hard_disc(size=SIZE, defect="pit", roi=roi, rng=np.random.default_rng(5))
    crop = disc.roi_crop(roi)
    x0, y0 = crop.origin
    height, width = crop.image.shape[:2]
    assert np.array_equal(crop.image, disc.image[y0:y0 + height, x0:x0 + width])
    whole = _roi_mask(disc.roi_shape(roi))
    inside = build_roi_mask(crop.shape, width=width, height=height) > 0
    # the crop's own mask is the whole image's ROI mask cut to the window, and nothing of the ROI lies outside it
    assert np.array_equal(inside, whole[y0:y0 + height, x0:x0 + width])
    assert int(inside.sum()) == int(whole.sum())
    assert int((crop.mask > 0).sum()) == int((disc.mask > 0).sum()) > 0
    # a tight window: the hub and the vents are cut well inside the disc image
    if roi != "ring":
        assert width < SIZE * 0.75 and height < SIZE * 0.75
