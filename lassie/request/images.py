"""User images: only the files Cog wrote for this request, decoded safely (any mode Pillow reads, EXIF rotation, no
decompression bombs)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath

from PIL import Image, ImageOps, UnidentifiedImageError

from lassie.request.errors import InputError
from lassie.request.sizes import check_mask_size

log = logging.getLogger(__name__)

MAX_INPUT_PIXELS = 64 * 1024 * 1024
SUPPORTED = "PNG, JPEG, WEBP, GIF, BMP or TIFF"
TOO_LARGE = f"images above {MAX_INPUT_PIXELS // 2**20} megapixels are refused"


def request_file(value: str | os.PathLike[str] | None, field: str) -> Path | None:
    """The file Cog fetched or decoded for this request, or an InputError naming `field`. coglet (0.23) turns an
    http(s) URL or data URI for a `Path` input into a fresh file in the worker's temp directory and hands predict() a
    `Path`; any other string ("/etc/ssl/private/key.png") arrives as sent, and opening it would read any image on the
    server's disk. So only a `Path` directly in that directory is used."""
    if value is None:
        return None
    if not isinstance(value, PurePath) or Path(value).resolve().parent != Path(tempfile.gettempdir()).resolve():
        raise InputError(field, "must be an http(s) URL or a data URI; paths on the server's disk are refused")
    return Path(value).resolve()


def _said(error: BaseException, path: Path, field: str) -> str:
    """Pillow's words for a problem, with the server's temporary path of the upload left out."""
    text = str(error)
    for spelled in dict.fromkeys((str(path), str(Path(path).resolve()))):
        text = text.replace(f"'{spelled}'", f"the uploaded {field}").replace(spelled, f"the uploaded {field}")
    return text


def _decoded(path: Path, field: str) -> Image.Image:
    """Opened lazily (header only) so the pixel count is checked before any decoding happens."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise InputError(field, f"{_said(error, path, field)}; {TOO_LARGE}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(field, f"could not be read as an image ({SUPPORTED}): {_said(error, path, field)}") from None
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        image.close()
        raise InputError(field, f"is {width}x{height} pixels; {TOO_LARGE}")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(field, f"is a damaged or truncated image: {_said(error, path, field)}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images would clip to white in a plain RGB conversion: rescale them."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    low, high = image.convert("F").getextrema()
    span = (high - low) or 1.0
    return image.convert("F").point(lambda v: (v - low) * 255.0 / span).convert("L")


def load_rgb(path: Path, field: str = "image") -> Image.Image:
    """An RGB image; transparency is composited over white rather than turned black."""
    image = _to_8bit(_decoded(path, field))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def load_mask(path: Path) -> Image.Image:
    """A greyscale mask at its own size: white is repainted, black kept."""
    return load_rgb(path, field="mask").convert("L")


@dataclass(frozen=True)
class Inputs:
    """A request's decoded `image` and `mask` (neither for text-to-image): at their own sizes as loaded, since the
    output size is planned from the image's; at the output size from `at`."""

    image: Image.Image | None = None
    mask: Image.Image | None = None

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self.image is None else self.image.size

    def at(self, size: tuple[int, int]) -> Inputs:
        """Both resized to the output size, as the pipelines take them."""
        if self.mask is not None and self.mask.size != size:
            log.info("mask: resized from %dx%d to %dx%d (the output size)", *self.mask.size, *size)
        return Inputs(image=None if self.image is None else resized(self.image, size),
                      mask=None if self.mask is None else resized(self.mask, size))


def load_inputs(image: Path | None, mask: Path | None) -> Inputs:
    """Decode the image, then the mask, each error naming its field; a mask must have the image's shape."""
    inputs = Inputs(image=None if image is None else load_rgb(image, field="image"),
                    mask=None if mask is None else load_mask(mask))
    if inputs.image is not None and inputs.mask is not None:
        check_mask_size(inputs.mask.size, inputs.image.size)
    return inputs
