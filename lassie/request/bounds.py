"""The schema's bounds and choices, written once as error messages print them (0 and 1, not 0.0 and 1.0): predict.py's
`Input(...)` reads them for the Cog server, `check_range`/`check_choice` again for direct library use. Aspect ratios
are the keys of `sizes.json`."""

from __future__ import annotations

from typing import NamedTuple

from lassie.request.errors import InputError


class Bound(NamedTuple):
    """An inclusive range of allowed values."""

    low: int | float
    high: int | float


SIDE = Bound(256, 1440)
"""Custom width and height; 1440 is also the longest side of an output taken from an input image."""

BOUNDS: dict[str, Bound] = {
    "num_outputs": Bound(1, 4), "num_inference_steps": Bound(1, 50), "guidance_scale": Bound(0, 10),
    "prompt_strength": Bound(0, 1), "output_quality": Bound(0, 100), "lora_scale": Bound(-1, 3),
    "extra_lora_scale": Bound(-1, 3), "width": SIDE, "height": SIDE, "seed": Bound(0, 2**64 - 1),
}
"""Every numeric input's range, in the order validation checks them. The schema leaves `seed` unbounded (so
predict.py does too); the library refuses seeds that do not fit the 64 bits torch's generator takes."""

CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("dev", "schnell"), "output_format": ("webp", "jpg", "png"), "megapixels": ("1", "0.25"),
}
"""The enum inputs' options, in the schema's order."""


def check_range(field: str, value: float) -> None:
    """Numbers print as given, so integer bounds are exact (2**64 - 1, not 1.84467e+19)."""
    bound = BOUNDS[field]
    if not bound.low <= value <= bound.high:
        raise InputError(field, f"must be between {bound.low} and {bound.high}, got {value}")


def check_choice(field: str, value: str, allowed: tuple[str, ...] | None = None) -> None:
    allowed = CHOICES[field] if allowed is None else allowed
    if value not in allowed:
        raise InputError(field, f"must be one of {', '.join(allowed)}, got {value!r}")
