"""Output sizes: the Replicate model's table, custom sizes, and sizes taken from an input image; plain arithmetic."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from lassie.request.bounds import CHOICES, SIDE, check_choice, check_range
from lassie.request.errors import InputError

SIZE_MULTIPLE = 16
CUSTOM = "custom"
MEGAPIXELS = CHOICES["megapixels"]


@cache
def size_table() -> dict[str, dict[str, tuple[int, int]]]:
    """megapixels -> aspect ratio -> (width, height), as the Replicate model returns them."""
    raw = json.loads(Path(__file__).with_name("sizes.json").read_text())
    return {mp: {ratio: (w, h) for ratio, (w, h) in raw[mp].items()} for mp in MEGAPIXELS}


def aspect_ratios() -> tuple[str, ...]:
    return (*size_table()["1"], CUSTOM)


def round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """Nearest multiple (halves round up), never below one multiple."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def table_size(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    check_choice("megapixels", megapixels)
    check_choice("aspect_ratio", aspect_ratio, tuple(size_table()[megapixels]))
    return size_table()[megapixels][aspect_ratio]


def custom_size(width: int | None, height: int | None) -> tuple[int, int]:
    """`aspect_ratio=custom`: both sides given, in bounds, rounded to the nearest multiple of 16."""
    for field, side in (("width", width), ("height", height)):
        if side is None:
            raise InputError(field, f"is required when aspect_ratio is custom ({SIDE.low}..{SIDE.high})")
        check_range(field, side)
    return round_to_multiple(width), round_to_multiple(height)


def size_from_image(width: int, height: int) -> tuple[int, int]:
    """The input image's aspect ratio with each side within 256..1440 (large images scaled down, small ones up), each
    side then a multiple of 16: both ends are, so the rounding stays within them. An image more elongated than
    1440x256 (5.625:1) has no such size: it is refused, naming `image`."""
    long, short = max(width, height), min(width, height)
    if long * SIDE.low > SIDE.high * short:
        raise InputError("image", f"is {width}x{height}, an aspect ratio of {long / short:.3g}:1; outputs are "
                                  f"{SIDE.low}..{SIDE.high} pixels per side, so an input image may be at most "
                                  f"{SIDE.high / SIDE.low:g}:1 ({SIDE.high}x{SIDE.low}); crop it closer to that")
    scale = min(SIDE.high / long, max(1.0, SIDE.low / short))
    return round_to_multiple(width * scale), round_to_multiple(height * scale)


def check_mask_size(mask: tuple[int, int], image: tuple[int, int]) -> None:
    """A mask is resized to the output size, so it must have the image's aspect ratio up to one pixel of its own
    rounding or the rounding to multiples of 16 (a mask drawn at the output size). |mask_w * image_h - mask_h *
    image_w| moves by an image side per mask pixel, and by 8 mask sides per 8 pixels."""
    (mask_w, mask_h), (image_w, image_h) = mask, image
    mismatch = abs(mask_w * image_h - mask_h * image_w)
    tolerance = max(image_w + image_h, SIZE_MULTIPLE // 2 * (mask_w + mask_h))
    if mismatch > tolerance:
        raise InputError("mask", f"is {mask_w}x{mask_h} but the image is {image_w}x{image_h}: a mask must have the "
                                 "image's aspect ratio (at any size), since both are resized to the output size")
