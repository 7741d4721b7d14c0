"""Unit tests for bdi.patchcore.imaging: decode, letterbox geometry, normalisation, shape parsing and ROI masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from bdi.errors import ImageDecodeError, InvalidInputError, InvalidScaleError, UploadLimitError
from bdi.patchcore.imaging import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Letterbox,
    build_roi_mask,
    decode_image,
    encode_png_gray,
    letterbox,
    letterbox_geometry,
    normalize_imagenet,
    parse_shape,
    validate_mm_per_px,
)


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return bytes(buf.tobytes())


def _rng_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ decode


def test_decode_color_png_roundtrips_bgr() -> None:
    image = _rng_image(7, 11)
    out = decode_image(_png(image))
    assert out.dtype == np.uint8 and out.shape == (7, 11, 3)
    np.testing.assert_array_equal(out, image)


def test_decode_grayscale_gives_three_equal_channels() -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    out = decode_image(_png(gray))
    assert out.shape == (5, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_decode_bgra_drops_alpha() -> None:
    bgra = np.zeros((4, 5, 4), dtype=np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 0
    out = decode_image(_png(bgra))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])


def test_decode_16bit_is_scaled_to_8bit() -> None:
    img16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    out = decode_image(_png(img16))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[:, :, 0], (img16 >> 8).astype(np.uint8))


def test_decode_garbage_bytes_raises_image_decode_error_with_name() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"definitely not an image", name="x.png")
    message = str(info.value)
    assert message.startswith("No se pudo decodificar la imagen")
    assert "x.png" in message
    assert "memory" not in message.lower() and "fit" not in message.lower()


def test_decode_empty_bytes_raises_image_decode_error() -> None:
    with pytest.raises(ImageDecodeError, match="No se pudo decodificar la imagen"):
        decode_image(b"", name="empty.png")


def test_decode_over_max_pixels_raises_upload_limit_naming_the_limit() -> None:
    data = _png(_rng_image(100, 100))
    with pytest.raises(UploadLimitError, match="5000"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)


def test_decode_checks_pixel_limit_from_header_before_decoding() -> None:
    truncated = _png(_rng_image(100, 100))[:120]  # header intact, pixel data cut off
    with pytest.raises(UploadLimitError):
        decode_image(truncated, max_pixels=5000)
    with pytest.raises(ImageDecodeError):
        decode_image(truncated)


def test_encode_png_gray_roundtrips() -> None:
    u8 = np.random.default_rng(1).integers(0, 256, (9, 13), dtype=np.uint8)
    data = encode_png_gray(u8)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(back, u8)


def test_encode_png_gray_rejects_color() -> None:
    with pytest.raises(InvalidInputError):
        encode_png_gray(np.zeros((3, 3, 3), np.uint8))


# ------------------------------------------------------------------------------------------ letterbox


def _reference_letterbox(image_bgr: np.ndarray, size: int) -> np.ndarray:
    """The legacy PIL recipe of docs/contract.md "Feature extractor", written independently."""
    pil = Image.fromarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    w, h = pil.size
    scale = min(size / w, size / h)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(pil.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


@pytest.mark.parametrize(("height", "width"), [(100, 100), (40, 60), (300, 100), (37, 448), (1, 1000)])
def test_letterbox_matches_the_legacy_pil_recipe(height: int, width: int) -> None:
    image = _rng_image(height, width)
    out, box = letterbox(image, 448)
    assert out.shape == (448, 448, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reference_letterbox(image, 448))
    assert (box.src_w, box.src_h) == (width, height)


def test_letterbox_square_image_fills_canvas() -> None:
    _, box = letterbox(_rng_image(100, 100), 56)
    assert (box.new_w, box.new_h, box.pad_left, box.pad_top) == (56, 56, 0, 0)
    assert box.content_tokens((4, 4)) == (slice(0, 4), slice(0, 4))


def test_letterbox_wide_image_is_padded_top_and_bottom() -> None:
    _, box = letterbox(_rng_image(100, 200), 448)
    assert (box.new_w, box.new_h, box.pad_left, box.pad_top) == (448, 224, 0, 112)
    assert box.scale == pytest.approx(2.24)
    assert box.content_box == (0, 112, 448, 336)
    assert box.content_tokens((32, 32)) == (slice(8, 24), slice(0, 32))


def test_letterbox_tall_image_is_padded_left_and_right() -> None:
    _, box = letterbox(_rng_image(300, 100), 448)
    assert (box.new_w, box.new_h) == (149, 448)
    assert (box.pad_left, box.pad_top) == ((448 - 149) // 2, 0)
    assert box.content_tokens((32, 32)) == (slice(0, 32), slice(10, 22))


def test_letterbox_converts_bgr_to_rgb_on_black_padding() -> None:
    blue_bgr = np.zeros((10, 20, 3), np.uint8)
    blue_bgr[..., 0] = 255
    out, box = letterbox(blue_bgr, 56)
    x0, y0, x1, y1 = box.content_box
    np.testing.assert_array_equal(out[(y0 + y1) // 2, (x0 + x1) // 2], [0, 0, 255])
    assert out[:y0].max() == 0 and out[y1:].max() == 0


@pytest.mark.parametrize(("src_w", "src_h"), [(60, 40), (40, 60), (999, 7), (7, 999), (448, 447), (13, 13)])
@pytest.mark.parametrize(("size", "grid"), [(56, (4, 4)), (448, (32, 32)), (112, (8, 8))])
def test_content_tokens_cover_content_and_no_pure_padding_token(
    src_w: int, src_h: int, size: int, grid: tuple[int, int]
) -> None:
    box = letterbox_geometry(src_w=src_w, src_h=src_h, size=size)
    rows, cols = box.content_tokens(grid)
    token = size // grid[0]
    x0, y0, x1, y1 = box.content_box
    # every content pixel lies inside the selected tokens
    assert rows.start * token <= y0 and y1 <= rows.stop * token
    assert cols.start * token <= x0 and x1 <= cols.stop * token
    # every selected token overlaps the content (outward rounding by at most a partial token)
    assert (rows.start + 1) * token > y0 and (rows.stop - 1) * token < y1
    assert (cols.start + 1) * token > x0 and (cols.stop - 1) * token < x1


def test_letterbox_rejects_non_bgr_input() -> None:
    with pytest.raises(InvalidInputError):
        letterbox(np.zeros((5, 5), np.uint8), 56)
    with pytest.raises(InvalidInputError):
        letterbox(np.zeros((5, 5, 3), np.float32), 56)


def test_letterbox_is_a_frozen_record() -> None:
    box = letterbox_geometry(src_w=10, src_h=20, size=56)
    assert isinstance(box, Letterbox)
    with pytest.raises(AttributeError):
        box.size = 3  # type: ignore[misc]
    assert box.to_dict()["new_h"] == 56


# ------------------------------------------------------------------------------------------ normalise


def test_normalize_imagenet_gives_chw_float32_with_imagenet_stats() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = 255
    out = normalize_imagenet(rgb)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    for c in range(3):
        assert out[c, 1, 1] == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-6)
        assert out[c, 0, 0] == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)


def test_normalize_imagenet_batched_equals_per_image() -> None:
    batch = np.stack([_rng_image(6, 6, seed=s) for s in range(3)])
    out = normalize_imagenet(batch)
    assert out.shape == (3, 3, 6, 6)
    np.testing.assert_array_equal(out[1], normalize_imagenet(batch[1]))


# ------------------------------------------------------------------------------------------ parse_shape


@pytest.mark.parametrize("text", [None, "", "   ", "null", "{}", "[]", "0", '""', "false"])
def test_parse_shape_empty_or_falsy_means_full_image(text: str | None) -> None:
    assert parse_shape(text) is None


def test_parse_shape_returns_object() -> None:
    assert parse_shape('{"kind":"rect","x":1}') == {"kind": "rect", "x": 1}


def test_parse_shape_accepts_already_parsed_dict() -> None:
    assert parse_shape({"kind": "circle"}) == {"kind": "circle"}
    assert parse_shape({}) is None


def test_parse_shape_malformed_json_raises_invalid_input() -> None:
    with pytest.raises(InvalidInputError, match="shape is not valid JSON"):
        parse_shape("{bad json")


@pytest.mark.parametrize("text", ["[1, 2]", '"rect"', "3"])
def test_parse_shape_truthy_non_object_raises_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInputError, match="JSON object"):
        parse_shape(text)


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("shape", [None, {}, {"kind": "hexagon", "x": 3}])
def test_mask_none_empty_or_unknown_kind_is_full_image(shape: dict | None) -> None:
    mask = build_roi_mask(shape, width=7, height=5)
    assert mask.shape == (5, 7) and mask.dtype == np.uint8
    assert (mask == 255).all()


def test_mask_rect_truncates_and_fills_half_open_box() -> None:
    mask = build_roi_mask({"kind": "RECT", "x": 1.9, "y": 2.2, "w": 3.7, "h": 2.9}, width=10, height=8)
    expected = np.zeros((8, 10), np.uint8)
    expected[2:4, 1:4] = 255
    np.testing.assert_array_equal(mask, expected)


def test_mask_missing_kind_is_rect() -> None:
    mask = build_roi_mask({"x": 0, "y": 0, "w": 2, "h": 3}, width=5, height=5)
    assert mask.sum() == 2 * 3 * 255 and mask[:3, :2].min() == 255


def test_mask_rect_defaults_cover_image() -> None:
    assert (build_roi_mask({"kind": "rect"}, width=6, height=4) == 255).all()


def test_mask_rect_is_clipped_to_the_image() -> None:
    mask = build_roi_mask({"kind": "rect", "x": -5, "y": 3, "w": 10, "h": 100}, width=8, height=6)
    expected = np.zeros((6, 8), np.uint8)
    expected[3:6, 0:5] = 255
    np.testing.assert_array_equal(mask, expected)
    assert build_roi_mask({"kind": "rect", "x": 50, "w": 5}, width=8, height=6).max() == 0


def test_mask_circle_is_filled_with_antialiased_fringe() -> None:
    mask = build_roi_mask({"kind": "circle", "cx": 20, "cy": 20, "r": 10}, width=41, height=41)
    assert mask[20, 20] == 255 and mask[20, 12] == 255
    assert mask[0, 0] == 0 and mask[20, 35] == 0
    fringe = (mask > 0) & (mask < 255)
    assert fringe.any()  # AA pixels count as inside because they are > 0
    np.testing.assert_array_equal(mask > 0, (mask > 0)[:, ::-1])  # symmetric support


def test_mask_circle_defaults_are_centred_inscribed() -> None:
    default = build_roi_mask({"kind": "circle"}, width=30, height=20)
    explicit = build_roi_mask({"kind": "circle", "cx": 15, "cy": 10, "r": 10}, width=30, height=20)
    np.testing.assert_array_equal(default, explicit)


def test_mask_circle_rounds_half_to_even() -> None:
    half = build_roi_mask({"kind": "circle", "cx": 10.5, "cy": 10, "r": 4}, width=30, height=30)
    even = build_roi_mask({"kind": "circle", "cx": 10, "cy": 10, "r": 4}, width=30, height=30)
    np.testing.assert_array_equal(half, even)
    up = build_roi_mask({"kind": "circle", "cx": 11.5, "cy": 10, "r": 4}, width=30, height=30)
    twelve = build_roi_mask({"kind": "circle", "cx": 12, "cy": 10, "r": 4}, width=30, height=30)
    np.testing.assert_array_equal(up, twelve)


def test_mask_annulus_inner_disc_and_outside_are_zero() -> None:
    shape = {"kind": "annulus", "cx": 30, "cy": 30, "r": 25, "r_inner": 10}
    mask = build_roi_mask(shape, width=61, height=61)
    assert mask[30, 30] == 0 and mask[30, 25] == 0  # inner disc
    assert mask[30, 48] == 255  # on the ring
    assert mask[0, 0] == 0 and mask[30, 60] == 0  # outside
    outer = build_roi_mask({"kind": "circle", "cx": 30, "cy": 30, "r": 25}, width=61, height=61)
    assert (mask <= outer).all()


def test_mask_annulus_negative_inner_radius_is_clamped() -> None:
    neg = build_roi_mask({"kind": "annulus", "cx": 10, "cy": 10, "r": 8, "r_inner": -4}, width=21, height=21)
    zero = build_roi_mask({"kind": "annulus", "cx": 10, "cy": 10, "r": 8}, width=21, height=21)
    np.testing.assert_array_equal(neg, zero)
    assert neg[10, 10] > 0


@pytest.mark.parametrize(
    "shape",
    [
        {"kind": "rect", "x": "abc"},
        {"kind": "circle", "r": [1, 2]},
        {"kind": "circle", "cx": float("nan")},
        {"kind": "annulus", "r_inner": {"a": 1}},
        {"kind": "rect", "w": float("inf")},
        {"kind": "circle", "r": -3},
        {"kind": 5},
    ],
)
def test_mask_bad_values_raise_invalid_input_not_type_error(shape: dict) -> None:
    with pytest.raises(InvalidInputError, match="shape"):
        build_roi_mask(shape, width=10, height=10)


def test_validate_mm_per_px_rejects_non_positive_and_non_finite() -> None:
    assert validate_mm_per_px(0.2) == 0.2
    assert validate_mm_per_px("0.5") == 0.5
    for bad in (0, -1, float("nan"), float("inf"), "abc", None, True):
        with pytest.raises(InvalidScaleError, match="mm_per_px must be > 0 and finite"):
            validate_mm_per_px(bad)
