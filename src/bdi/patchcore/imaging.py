"""Image decoding and geometry: decode (images, ground-truth masks), the mm_per_px rule, letterbox (+ its
inverse), normalise, ROI masks. No torch.

All images are NumPy arrays: decoded images are BGR ``uint8`` ``(H, W, 3)`` (OpenCV order), letterboxed
images are RGB ``uint8`` ``(size, size, 3)`` (docs/contract.md "Feature extractor"), masks are ``uint8`` ``(H, W)``
in 0..255 (docs/contract.md "ROI mask").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from bdi.errors import ImageDecodeError, InvalidInputError, InvalidScaleError, UploadLimitError
from bdi.patchcore.image_headers import ImageHeader, read_header

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_DECODE_PREFIX = "No se pudo decodificar la imagen"


# --------------------------------------------------------------------------------------------- decoding


def _checked_header(data: bytes, *, max_pixels: int | None, name: str, what: str) -> ImageHeader:
    """The header of ``data`` (:func:`bdi.patchcore.image_headers.read_header`), refused before any pixel is
    decoded: :class:`ImageDecodeError` when it is empty, not an accepted format or its header is invalid,
    :class:`UploadLimitError` when it declares more than ``max_pixels`` pixels."""
    header = read_header(data) if data else None
    if header is None:
        raise ImageDecodeError(what)
    _check_pixels(width=header.width, height=header.height, max_pixels=max_pixels, name=name)
    return header


def _check_pixels(*, width: int, height: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        label = f" {name}" if name else ""
        raise UploadLimitError(
            f"Image{label} has {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels per image (BDI_MAX_IMAGE_PIXELS)"
        )


def decode_image(data: bytes, *, max_pixels: int | None = None, name: str = "") -> np.ndarray:
    """Decode encoded image bytes to a 3-channel BGR ``uint8`` array ``(H, W, 3)``.

    Only the formats of :data:`bdi.patchcore.image_headers.ACCEPTED_FORMATS` (PNG, JPEG, BMP, WebP) are
    decoded, and ``max_pixels`` is checked on their header before OpenCV allocates anything. Decoding
    follows the reference backend (OpenCV ``IMREAD_COLOR``): grayscale is expanded to BGR, an alpha
    channel is dropped and 16-bit samples are scaled to 8 bits.

    Raises:
        ImageDecodeError: empty bytes, another format, or bytes that do not decode.
        UploadLimitError: the header declares more than ``max_pixels`` pixels.
    """
    _checked_header(data, max_pixels=max_pixels, name=name, what=f"{_DECODE_PREFIX}: {name}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image: np.ndarray | None = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:  # also OpenCV's own limit, OPENCV_IO_MAX_IMAGE_PIXELS
        raise ImageDecodeError(f"{_DECODE_PREFIX}: {name}") from exc
    if image is None or image.size == 0:
        raise ImageDecodeError(f"{_DECODE_PREFIX}: {name}")
    height, width = image.shape[:2]
    _check_pixels(width=width, height=height, max_pixels=max_pixels, name=name)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.dtype != np.uint8:  # IMREAD_COLOR already gives 8 bits; kept for exotic codecs
        scale = 255.0 / float(np.iinfo(image.dtype).max) if image.dtype.kind in "ui" else 255.0
        image = np.clip(image.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def decode_mask(data: bytes, *, max_pixels: int | None = None, name: str = "") -> np.ndarray:
    """Decode a ground-truth mask to grayscale ``uint8`` ``(H, W)``, in the formats and within the pixel
    limit of :func:`decode_image`; :class:`ImageDecodeError` when it cannot be."""
    _checked_header(data, max_pixels=max_pixels, name=name, what=f"mask {name} cannot be decoded")
    try:
        mask: np.ndarray | None = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:
        raise ImageDecodeError(f"mask {name} cannot be decoded") from exc
    if mask is None or mask.size == 0:
        raise ImageDecodeError(f"mask {name} cannot be decoded")
    return mask


def channel_count(data: bytes) -> int | None:
    """How many channels the encoded image stores (1 gray, 3 colour, 4 with alpha); None when undecodable or not
    an accepted format. Decodes the whole image: call it on bytes :func:`decode_image` accepted."""
    if read_header(data) is None:
        return None
    try:
        raw: np.ndarray | None = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if raw is None:
        return None
    return 1 if raw.ndim == 2 else int(raw.shape[2])


def validate_mm_per_px(value: object) -> float:
    """The pixel scale ``value`` as a finite float > 0 (docs/contract.md "Scale lock"), else
    :class:`InvalidScaleError`."""
    if isinstance(value, bool):
        raise InvalidScaleError()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidScaleError() from exc
    if not math.isfinite(number) or number <= 0:
        raise InvalidScaleError()
    return number


def encode_png_gray(u8: np.ndarray) -> bytes:
    """Encode a single-channel ``uint8`` ``(H, W)`` array as PNG bytes."""
    if u8.ndim != 2 or u8.dtype != np.uint8 or u8.size == 0:
        raise InvalidInputError(f"expected a non-empty uint8 (H, W) array, got {u8.dtype} {u8.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(u8))
    if not ok:
        raise InvalidInputError("PNG encoding failed")
    return bytes(buf.tobytes())


# --------------------------------------------------------------------------------------------- letterbox


@dataclass(frozen=True)
class Letterbox:
    """Where a ``src_w × src_h`` image sits inside the ``size × size`` letterbox canvas.

    The content occupies letterbox pixels ``[pad_left, pad_left + new_w) × [pad_top, pad_top + new_h)``;
    the rest is black padding. ``scale`` = new / src (before rounding).
    """

    size: int
    src_w: int
    src_h: int
    new_w: int
    new_h: int
    pad_left: int
    pad_top: int
    scale: float

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the content in letterbox pixels, half-open."""
        return (self.pad_left, self.pad_top, self.pad_left + self.new_w, self.pad_top + self.new_h)

    def content_tokens(self, grid: tuple[int, int]) -> tuple[slice, slice]:
        """Token rows and columns of a ``grid = (Ht, Wt)`` token map that overlap the content.

        Each token covers ``size / Ht`` × ``size / Wt`` letterbox pixels. Rounding is outward, so every
        content pixel lies in a selected token (padding tokens that touch the content are kept).

        Returns:
            ``(rows, cols)`` slices, to index a ``(Ht, Wt, ...)`` array as ``arr[rows, cols]``.
        """
        grid_h, grid_w = int(grid[0]), int(grid[1])
        if grid_h < 1 or grid_w < 1:
            raise InvalidInputError(f"token grid must be positive, got {grid}")
        x0, y0, x1, y1 = self.content_box
        # floor(start * g / size) and ceil(stop * g / size) in exact integer arithmetic
        row0 = (y0 * grid_h) // self.size
        row1 = -((-y1 * grid_h) // self.size)
        col0 = (x0 * grid_w) // self.size
        col1 = -((-x1 * grid_w) // self.size)
        return slice(max(0, row0), min(grid_h, row1)), slice(max(0, col0), min(grid_w, col1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "src_w": self.src_w,
            "src_h": self.src_h,
            "new_w": self.new_w,
            "new_h": self.new_h,
            "pad_left": self.pad_left,
            "pad_top": self.pad_top,
            "scale": self.scale,
        }


def _check_bgr(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise InvalidInputError(f"expected a BGR image of shape (H, W, 3), got {shape}")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"expected a uint8 image, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInputError(f"image is empty: {image.shape}")


def letterbox_geometry(*, src_w: int, src_h: int, size: int) -> Letterbox:
    """The letterbox of docs/contract.md "Feature extractor" for a ``src_w × src_h`` image, without touching pixels."""
    if src_w < 1 or src_h < 1 or size < 1:
        raise InvalidInputError(f"invalid letterbox request: {src_w}x{src_h} into {size}")
    scale = min(size / src_w, size / src_h)
    new_w = min(size, max(1, int(round(src_w * scale))))
    new_h = min(size, max(1, int(round(src_h * scale))))
    return Letterbox(
        size=size,
        src_w=src_w,
        src_h=src_h,
        new_w=new_w,
        new_h=new_h,
        pad_left=(size - new_w) // 2,
        pad_top=(size - new_h) // 2,
        scale=scale,
    )


def letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox a BGR ``uint8`` ``(H, W, 3)`` image into an RGB ``uint8`` ``(size, size, 3)`` canvas.

    BGR → RGB, scale = min(size/w, size/h), rounded new size (≥ 1 px), PIL bicubic
    resize, pasted on black at offsets floor((size − new) / 2).
    """
    _check_bgr(image_bgr)
    src_h, src_w = image_bgr.shape[:2]
    box = letterbox_geometry(src_w=src_w, src_h=src_h, size=size)
    rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
    resized = Image.fromarray(rgb, mode="RGB").resize((box.new_w, box.new_h), Image.Resampling.BICUBIC)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box.content_box
    canvas[y0:y1, x0:x1] = np.asarray(resized, dtype=np.uint8)
    return canvas, box


# standardize_intensity's targets: a mid-grey mean and the spread of a typical machined surface's shot (the good
# magnetic tiles' median standard deviation is 30, their 5th-95th percentiles 18-50); 40 was chosen over 25 and 60
# on the calibration halves (docs/quality.md "Intensity")
INTENSITY_MEAN = 128.0
INTENSITY_STD = 40.0
# the most a dim, flat part's contrast is raised: far enough for the dullest good tile (std 18), not so far that a
# polished surface's sensor noise becomes texture
MAX_INTENSITY_GAIN = 2.5


def standardize_intensity(canvas: np.ndarray, box: Letterbox) -> np.ndarray:
    """A letterboxed ``uint8`` canvas as float32 with the content's grey levels shifted and scaled to mean
    :data:`INTENSITY_MEAN` and standard deviation :data:`INTENSITY_STD`: one affine map for all channels (colours keep
    their balance), the padding left black. A part shot darker, brighter or at another contrast then looks like the
    others, and what differs inside it still does: the values are not clipped to 0-255, so a bright defect on a
    flat, dim part keeps its contrast. The gain is at most :data:`MAX_INTENSITY_GAIN`, so a nearly flat part keeps
    its low contrast (its noise is not made texture); a flat image becomes flat mid-grey.
    """
    out = canvas.astype(np.float32)
    x0, y0, x1, y1 = box.content_box
    content = out[y0:y1, x0:x1]  # a view: edited in place
    mean, std = float(content.mean()), float(content.std())
    content -= mean
    content *= min(INTENSITY_STD / std, MAX_INTENSITY_GAIN) if std > 1e-3 else 0.0
    content += INTENSITY_MEAN
    return out


def normalize_imagenet(rgb: np.ndarray) -> np.ndarray:
    """ImageNet-normalise RGB uint8 (H, W, 3) or (B, H, W, 3) to float32 (3, H, W) or (B, 3, H, W) (float input in
    0-255 scale, as :func:`standardize_intensity` gives, is taken as it is).

    Same arithmetic as torchvision ``ToTensor`` + ``Normalize``: ``(x / 255 − mean) / std`` in float32,
    element for element (bitwise the same values), in one float buffer: the channels are moved first
    while still ``uint8``, then divided and shifted in place.
    """
    if rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
        raise InvalidInputError(f"expected RGB (..., H, W, 3), got {rgb.shape}")
    axes = (2, 0, 1) if rgb.ndim == 3 else (0, 3, 1, 2)
    x = np.ascontiguousarray(rgb.transpose(axes)).astype(np.float32, copy=False)  # a float input: already copied
    x /= np.float32(255.0)
    x -= _MEAN_CHW
    x /= _STD_CHW
    return x


_MEAN_CHW = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD_CHW = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


# --------------------------------------------------------------------------------------------- ROI masks


def parse_shape(text: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Parse the ``shape`` field (docs/contract.md "ROI mask").

    ``None``/empty text and falsy JSON (``null``, ``{}``, ``[]``, ``0``, ``""``, ``false``) mean the full
    image and give ``None``. An already-parsed mapping is accepted (dataset sidecars store either form).

    Raises:
        InvalidInputError: malformed JSON, or a truthy value that is not an object.
    """
    if text is None:
        return None
    if isinstance(text, Mapping):
        return dict(text) if text else None
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise InvalidInputError(f"shape must be a JSON object, got {type(text).__name__}")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"shape is not valid JSON: {exc}") from exc
    if not value:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(
            f"shape must be a JSON object such as {{\"kind\": \"rect\", ...}}, got {type(value).__name__}"
        )
    return value


def _number(shape: Mapping[str, Any], key: str, default: float) -> float:
    """A finite number from ``shape[key]`` (missing or null → ``default``)."""
    value = shape.get(key)
    if value is None:
        return float(default)
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and value.strip()):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if math.isfinite(number):
            return number
    raise InvalidInputError(f"shape.{key} must be a finite number, got {value!r}")


_MAX_DRAW_COORD = 1 << 24  # OpenCV drawing takes int32 coordinates; far beyond any real crop


def _rounded(shape: Mapping[str, Any], key: str, default: float) -> int:
    """``round()`` of a finite number (Python half-to-even), within OpenCV's drawing range."""
    number = _number(shape, key, default)
    result = int(round(number))
    if abs(result) > _MAX_DRAW_COORD:
        raise InvalidInputError(f"shape.{key} is out of range: {number!r}")
    return result


def _draw_disc(mask: np.ndarray, *, center: tuple[int, int], radius: int) -> None:
    try:
        cv2.circle(mask, center, radius, 255, thickness=-1, lineType=cv2.LINE_AA)
    except cv2.error as exc:
        raise InvalidInputError(f"shape circle cannot be drawn: center={center}, r={radius}") from exc


@dataclass(frozen=True)
class Annulus:
    """An ``annulus`` shape's geometry in crop px, unrounded (the mask rounds it to draw)."""

    cx: float
    cy: float
    r_inner: float
    r: float


def annulus_of(shape: Mapping[str, Any] | None, *, width: int, height: int) -> Annulus | None:
    """The geometry of an ``annulus`` shape with build_roi_mask's defaults and checks; None for any other shape."""
    if not shape or not isinstance(shape, Mapping):
        return None
    kind = shape.get("kind")
    if not isinstance(kind, str) or kind.strip().lower() != "annulus":
        return None
    r = _number(shape, "r", min(height, width) / 2)
    if r < 0:
        raise InvalidInputError(f"shape.r must be >= 0, got {shape.get('r')!r}")
    return Annulus(cx=_number(shape, "cx", width / 2), cy=_number(shape, "cy", height / 2),
                   r_inner=max(0.0, _number(shape, "r_inner", 0)), r=r)


def build_roi_mask(shape: Mapping[str, Any] | None, *, width: int, height: int) -> np.ndarray:
    """The ROI mask of docs/contract.md "ROI mask": ``uint8`` ``(height, width)``, 0..255, ``> 0`` means inside.

    * ``None``/empty or an unknown ``kind``: the full image (all 255).
    * ``rect`` (also when ``kind`` is missing): x, y, w, h truncated by ``int()``, defaults 0, 0, W, H;
      fills ``[x, x+w) × [y, y+h)`` clipped to the image.
    * ``circle``: cx, cy, r rounded (Python ``round``), defaults W/2, H/2, min(H, W)/2; filled with
      anti-aliasing, so fringe pixels are partly inside.
    * ``annulus``: the circle minus the inner circle ``r_inner`` (default 0, clamped ≥ 0), saturating.

    Raises:
        InvalidInputError: a value that is not a finite number, a negative radius, a non-string kind.
    """
    if width < 1 or height < 1:
        raise InvalidInputError(f"mask size must be positive, got {width}x{height}")
    full = np.full((height, width), 255, dtype=np.uint8)
    if not shape:
        return full
    if not isinstance(shape, Mapping):
        raise InvalidInputError(f"shape must be a JSON object, got {type(shape).__name__}")
    kind_value = shape.get("kind")
    if kind_value is None:
        kind = "rect"
    elif isinstance(kind_value, str):
        kind = kind_value.strip().lower()
    else:
        raise InvalidInputError(f"shape.kind must be a string, got {kind_value!r}")

    mask = np.zeros((height, width), dtype=np.uint8)
    if kind == "rect":
        x = int(_number(shape, "x", 0))
        y = int(_number(shape, "y", 0))
        w = int(_number(shape, "w", width))
        h = int(_number(shape, "h", height))
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(width, x + w), min(height, y + h)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = 255
        return mask
    if kind in ("circle", "annulus"):
        cx = _rounded(shape, "cx", width / 2)
        cy = _rounded(shape, "cy", height / 2)
        r = _rounded(shape, "r", min(height, width) / 2)
        if r < 0:
            raise InvalidInputError(f"shape.r must be >= 0, got {shape.get('r')!r}")
        _draw_disc(mask, center=(cx, cy), radius=r)
        if kind == "circle":
            return mask
        r_inner = max(0, _rounded(shape, "r_inner", 0))
        inner = np.zeros_like(mask)
        _draw_disc(inner, center=(cx, cy), radius=r_inner)
        return cv2.subtract(mask, inner)
    return full
