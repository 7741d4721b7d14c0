"""Decompression bombs (issue 30): small files that declare a huge image and decode to it in full, built in a
fraction of a second without ever holding the decoded size in memory."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, body: bytes, *, crc: int | None = None) -> bytes:
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value)


def png_bomb(*, width: int, height: int) -> bytes:
    """A valid black RGB PNG of ``width × height`` (OpenCV decodes it in full) that carries an ancillary
    ``tEXt`` chunk with a wrong CRC, which makes PIL refuse the header.

    The zero rows are deflated once per block of rows with a full flush, so the same compressed block
    repeats; every byte is zero, so the Adler-32 of ``n`` bytes is ``(n mod 65521) << 16 | 1``."""
    row = b"\x00" * (width * 3 + 1)  # filter byte + RGB
    rows_per_block = max(1, min(height, (8 << 20) // len(row)))
    block = row * rows_per_block
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(height, rows_per_block)
    body = [segment * blocks]
    if rest:
        body.append(deflate.compress(row * rest))
    body.append(deflate.flush(zlib.Z_FINISH))
    adler = ((len(row) * height) % 65521) << 16 | 1
    stream = b"\x78\xda" + b"".join(body) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", b"Comment\x00bomb", crc=0)
            + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))


def radiance_bomb(*, width: int, height: int) -> bytes:
    """A flat Radiance ``.hdr`` of ``width × height`` (run-length encoded scanlines; OpenCV decodes it to
    float32)."""
    runs = []
    left = width
    while left:
        n = min(127, left)
        runs.append(bytes((128 + n, 0)))
        left -= n
    line = struct.pack(">BBH", 2, 2, width) + b"".join(runs) * 4
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode() + line * height
