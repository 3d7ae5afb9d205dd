import io
import struct
import zlib

import pytest
from PIL import Image

from lassie.request.errors import InputError
from lassie.request.images import Inputs, load_inputs, load_mask, load_rgb, resized


def save(image: Image.Image, path, fmt="PNG", **options):
    image.save(path, format=fmt, **options)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_every_common_mode_becomes_rgb(tmp_path, mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    image = Image.new(mode, (40, 30))
    loaded = load_rgb(save(image, tmp_path / "in", fmt))
    assert (loaded.mode, loaded.size) == ("RGB", (40, 30))


def test_transparent_pixels_become_white_not_black(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_rgb(save(image, tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as portrait
    loaded = load_rgb(save(image, tmp_path / "r.jpg", "JPEG", exif=exif.tobytes()))
    assert loaded.size == (20, 60)


def test_not_an_image_is_a_clear_error(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("hello, I am text")
    with pytest.raises(InputError, match=r"^image: could not be read as an image"):
        load_rgb(path)


def test_truncated_image_is_a_clear_error(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 50).convert("RGB").save(buffer, format="PNG")
    path = tmp_path / "t.png"
    path.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(InputError, match=r"^image: "):
        load_rgb(path)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: refused from its header, before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(InputError, match=r"^image: .*megapixels are refused"):
        load_rgb(path)
    path.write_bytes(png_header_only(9000, 9000))
    with pytest.raises(InputError, match="megapixels are refused"):
        load_rgb(path)


def test_masks_are_greyscale_at_the_output_size(tmp_path):
    mask = resized(load_mask(save(Image.new("RGB", (100, 50), "white"), tmp_path / "m.png")), (64, 32))
    assert (mask.mode, mask.size, mask.getpixel((3, 3))) == ("L", (64, 32), 255)
    with pytest.raises(InputError, match=r"^mask: "):
        (tmp_path / "bad").write_bytes(b"nope")
        load_mask(tmp_path / "bad")


def test_inputs_decode_at_their_own_sizes_then_resize_together(tmp_path):
    """The output size is planned from the decoded image's size, so decoding resizes nothing."""
    inputs = load_inputs(save(Image.new("RGB", (100, 50), "red"), tmp_path / "i.png"),
                         save(Image.new("RGB", (10, 6), "white"), tmp_path / "m.png"))
    assert (inputs.image_size, inputs.image.mode) == ((100, 50), "RGB")
    assert (inputs.mask.size, inputs.mask.mode) == ((10, 6), "L")
    at = inputs.at((64, 32))
    assert (at.image.size, at.mask.size, at.mask.getpixel((3, 3))) == ((64, 32), (64, 32), 255)
    assert load_inputs(None, None) == Inputs() and Inputs().image_size is None


def test_a_bad_image_is_named_before_a_bad_mask(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError, match=r"^image: "):
        load_inputs(bad, bad)
    with pytest.raises(InputError, match=r"^mask: "):
        load_inputs(save(Image.new("RGB", (8, 8)), tmp_path / "i.png"), bad)
