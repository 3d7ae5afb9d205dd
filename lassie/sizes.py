"""Output sizes: the Replicate model's table, custom sizes, and sizes taken from an input image.

Pure arithmetic, no torch: everything here is unit-tested on plain numbers.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from lassie.bounds import BOUNDS, CHOICES, SIDE
from lassie.errors import InputError

SIZE_MULTIPLE = 16
CUSTOM = "custom"
MEGAPIXELS = CHOICES["megapixels"]
SIZES_FILE = Path(__file__).with_name("sizes.json")


@cache
def size_table() -> dict[str, dict[str, tuple[int, int]]]:
    """megapixels -> aspect ratio -> (width, height), as the Replicate model returns them."""
    raw = json.loads(SIZES_FILE.read_text())
    return {mp: {ratio: (w, h) for ratio, (w, h) in raw[mp].items()} for mp in MEGAPIXELS}


def aspect_ratios() -> tuple[str, ...]:
    return tuple(size_table()["1"]) + (CUSTOM,)


def round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """Nearest multiple (halves round up), never below one multiple."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def table_size(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    if megapixels not in MEGAPIXELS:
        raise InputError("megapixels", f"must be one of {', '.join(MEGAPIXELS)}, got {megapixels!r}")
    try:
        return size_table()[megapixels][aspect_ratio]
    except KeyError:
        allowed = ", ".join(aspect_ratios())
        raise InputError("aspect_ratio", f"must be one of {allowed}, got {aspect_ratio!r}") from None


def custom_size(width: int | None, height: int | None) -> tuple[int, int]:
    """`aspect_ratio=custom`: both sides given, in bounds, rounded to the nearest multiple of 16."""
    sides = {"width": width, "height": height}
    for field, side in sides.items():
        bound = BOUNDS[field]
        if side is None:
            raise InputError(field, f"is required when aspect_ratio is custom ({bound.low}..{bound.high})")
        if side not in bound:
            raise InputError(field, f"must be between {bound.low} and {bound.high}, got {side}")
    return round_to_multiple(width), round_to_multiple(height)


def size_from_image(width: int, height: int) -> tuple[int, int]:
    """Keep the input image's aspect ratio, fit within 1440, then make each side a multiple of 16."""
    scale = min(1.0, SIDE.high / max(width, height))
    return round_to_multiple(width * scale), round_to_multiple(height * scale)
