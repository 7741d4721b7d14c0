"""The accepted image formats and their pixel size, read from the header without decoding a pixel.

The decoder (:func:`bdi.patchcore.imaging.decode_image`) accepts exactly the formats the contract lists
(docs/contract.md "GET /datasets/list": ``.png .jpg .jpeg .bmp .webp``; the GUI sends PNG), recognised by
their signature, never by a file name. For each, the size comes from the same header fields the codec
(libpng, libjpeg, OpenCV's BMP reader, libwebp) then allocates from, so a pixel limit checked here holds
before any memory is allocated for pixels. Anything else (TIFF, Radiance HDR, PNM, OpenEXR, …) is refused
before OpenCV sees it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ACCEPTED_FORMATS = ("png", "jpeg", "bmp", "webp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: no length field


@dataclass(frozen=True, kw_only=True)
class ImageHeader:
    """What an encoded image declares: its format (one of :data:`ACCEPTED_FORMATS`) and size in pixels."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> ImageHeader | None:
    """The format and declared size of ``data``; None when it is not one of :data:`ACCEPTED_FORMATS` or
    its header is cut off or invalid (zero or negative sides)."""
    if data.startswith(_PNG_SIGNATURE):
        header = _png(data)
    elif data.startswith(b"\xff\xd8"):
        header = _jpeg(data)
    elif data.startswith(b"BM"):
        header = _bmp(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        header = _webp(data)
    else:
        return None
    if header is None or header.width < 1 or header.height < 1:
        return None
    return header


def _png(data: bytes) -> ImageHeader | None:
    # the IHDR chunk must come first (PNG spec 5.6): length, b"IHDR", width, height (big-endian)
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return ImageHeader(format="png", width=width, height=height)


def _jpeg(data: bytes) -> ImageHeader | None:
    """The first start-of-frame segment (libjpeg refuses a second one)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return ImageHeader(format="jpeg", width=width, height=height)  # height 0 (DNL): invalid
        pos += 2 + length
    return None


def _bmp(data: bytes) -> ImageHeader | None:
    if len(data) < 26:
        return None
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # BITMAPCOREHEADER: unsigned 16-bit sides
        width, height = struct.unpack("<HH", data[18:22])
        return ImageHeader(format="bmp", width=width, height=height)
    if dib_size < 40:
        return None
    width, height = struct.unpack("<ii", data[18:26])  # a negative height is a top-down bitmap
    return ImageHeader(format="bmp", width=width, height=abs(height))


def _webp(data: bytes) -> ImageHeader | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: the canvas, which every frame must fit in
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return ImageHeader(format="webp", width=width, height=height)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit sides minus one
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageHeader(format="webp", width=(bits & 0x3FFF) + 1, height=((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader(format="webp", width=width & 0x3FFF, height=height & 0x3FFF)
    return None
