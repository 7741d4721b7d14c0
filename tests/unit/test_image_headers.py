"""Unit tests for bdi.patchcore.image_headers and the decoder's refusal before decoding (issue 30 item 1): the
accepted formats give their size from the header, a header over the pixel limit is refused whatever follows it,
and any other format is refused before OpenCV sees it."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from bdi.config import Settings
from bdi.errors import ImageDecodeError, UploadLimitError
from bdi.patchcore.image_headers import ACCEPTED_FORMATS, read_header
from bdi.patchcore.imaging import decode_image, decode_mask
from tests.helpers.bombs import png_bomb, radiance_bomb

LIMIT = 40_000_000  # the default BDI_MAX_IMAGE_PIXELS
ENCODINGS = {"png": (".png", []), "jpeg": (".jpg", []), "bmp": (".bmp", []),
             "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
             "webp-lossless": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])}


def _encoded(kind: str, *, width: int = 64, height: int = 48) -> bytes:
    ext, params = ENCODINGS[kind]
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image, params)
    assert ok
    return bytes(buf.tobytes())


def _declaring(kind: str, *, width: int, height: int) -> bytes:
    """A small valid image of ``kind`` whose header is rewritten to declare ``width × height``."""
    data = bytearray(_encoded(kind))
    if kind == "png":
        data[16:24] = struct.pack(">II", width, height)  # IHDR, its CRC now wrong
    elif kind == "jpeg":
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    elif kind == "bmp":
        data[18:26] = struct.pack("<ii", width, height)
    elif kind == "webp":
        data[26:30] = struct.pack("<HH", width, height)
    else:  # lossless: 14-bit sides minus one after the 0x2f signature
        data[21:25] = struct.pack("<I", (width - 1) | ((height - 1) << 14) | (data[24] >> 4 << 28))
    return bytes(data)


@pytest.mark.parametrize("kind", sorted(ENCODINGS))
def test_each_accepted_format_reads_its_size_from_the_header(kind: str) -> None:
    header = read_header(_encoded(kind, width=64, height=48))
    assert header is not None and header.format in ACCEPTED_FORMATS
    assert (header.width, header.height) == (64, 48)
    assert decode_image(_encoded(kind), max_pixels=64 * 48).shape == (48, 64, 3)


@pytest.mark.parametrize("kind", sorted(ENCODINGS))
def test_a_header_over_the_pixel_limit_is_refused_before_decoding(kind: str) -> None:
    side = 16383  # the largest WebP side; 268 Mpx
    bomb = _declaring(kind, width=side, height=side)
    with pytest.raises(UploadLimitError, match="BDI_MAX_IMAGE_PIXELS"):
        decode_image(bomb, max_pixels=LIMIT, name="bomb")
    with pytest.raises(UploadLimitError, match="BDI_MAX_IMAGE_PIXELS"):
        decode_mask(bomb, max_pixels=LIMIT, name="bomb")


def test_the_png_bomb_with_a_bad_crc_chunk_is_refused_at_once() -> None:
    bomb = png_bomb(width=20000, height=20000)  # decodes to 1.2 GB
    started = time.perf_counter()
    with pytest.raises(UploadLimitError, match="20000x20000"):
        decode_image(bomb, max_pixels=LIMIT, name="bomb.png")
    assert time.perf_counter() - started < 0.1


@pytest.mark.parametrize("data", [
    radiance_bomb(width=10000, height=10000)[:4096],
    b"II*\x00" + b"\x00" * 64,  # TIFF
    b"P6\n10000 10000\n255\n" + b"\x00" * 64,  # PNM
], ids=["radiance-hdr", "tiff", "pnm"])
def test_formats_outside_the_contract_are_refused_before_opencv_sees_them(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="No se pudo decodificar"):
        decode_image(data, max_pixels=LIMIT, name="x")
    with pytest.raises(ImageDecodeError):
        decode_mask(data, name="x")


def test_a_format_opencv_decodes_but_the_contract_does_not_list_is_refused() -> None:
    ok, tiff = cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))
    assert ok and cv2.imdecode(tiff, cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(tiff.tobytes()))


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xda", b"BM" + b"\x00" * 30,
                                  b"RIFF\x00\x00\x00\x00WEBPVP8 "], ids=["empty", "png", "jpeg", "bmp", "webp"])
def test_cut_off_or_zero_sized_headers_read_as_undecodable(data: bytes) -> None:
    assert read_header(data) is None


def test_opencv_env_sets_the_limit_opencv_itself_enforces() -> None:
    """``Settings.opencv_env`` names the variable OpenCV reads when ``cv2`` is imported: a process started with
    it cannot decode an image over the limit even past BDI's own check."""
    env = {**os.environ, **Settings(max_image_pixels=100).opencv_env()}
    probe = ("import cv2, numpy as np\n"
             "ok, buf = cv2.imencode('.png', np.zeros((20, 20, 3), np.uint8))\n"
             "try:\n    print(cv2.imdecode(buf, cv2.IMREAD_COLOR) is None)\n"
             "except cv2.error:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() in ("refused", "True")
