"""The schema's bounds and choices, written once: predict.py's `Input(...)`, request validation and sizes read them.

Pure data, no torch. The Cog server checks the bounds from the OpenAPI schema that predict.py's
`Input(ge=..., le=..., choices=...)` produce; `lassie.request.plan` checks the same numbers again for
direct library use, and `lassie.request.sizes` takes its side limits from here. Bounds are written as the
error messages print them (0 and 1, not 0.0 and 1.0); Cog's schema shows number bounds as floats
whatever they are written as. Aspect ratios are the one choice list not here: they are the keys of
`sizes.json`, read by `lassie.request.sizes.aspect_ratios`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """An inclusive range of allowed values."""

    low: int | float
    high: int | float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


SIDE = Bound(256, 1440)
"""Custom width and height; 1440 is also the longest side of an output taken from an input image."""

BOUNDS: dict[str, Bound] = {
    "width": SIDE,
    "height": SIDE,
    "prompt_strength": Bound(0, 1),
    "num_outputs": Bound(1, 4),
    "num_inference_steps": Bound(1, 50),
    "guidance_scale": Bound(0, 10),
    "seed": Bound(0, 2**64 - 1),
    "output_quality": Bound(0, 100),
    "lora_scale": Bound(-1, 3),
    "extra_lora_scale": Bound(-1, 3),
}
"""Every numeric input's range. The schema leaves `seed` unbounded (so predict.py does too); the
library refuses seeds that do not fit the 64 bits torch's generator takes."""

CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("dev", "schnell"),
    "output_format": ("webp", "jpg", "png"),
    "megapixels": ("1", "0.25"),
}
"""The enum inputs' options, in the schema's order."""
