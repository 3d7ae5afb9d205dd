"""Output files: lossless PNG at zlib's fastest level (encoding is on every request's clock)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from lassie.request.outputs import save_images


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        chunks.append((data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]))
        offset += 12 + length
    return chunks


def test_png_is_lossless_and_compressed_at_the_fastest_zlib_level(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    [path] = save_images([Image.fromarray(pixels)], "png", 80, tmp_path)
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    stream = b"".join(body for kind, body in png_chunks(path.read_bytes()) if kind == b"IDAT")
    assert stream[1] >> 6 == 0  # the zlib header's FLEVEL: 0 is "fastest" (level 0 or 1), Pillow's default is 2
    zlib.decompress(stream)
