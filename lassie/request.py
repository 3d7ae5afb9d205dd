"""A request (the schema's fields) becomes a validated, fully decided `Plan`.

Pure and torch-free: every decision about a prediction (mode, size, steps, seed, effective LoRA
scales, precision) is made here, so it is testable without models and logged in one place.
The Cog server validates bounds from the OpenAPI schema too; checking again here keeps direct
library use (tests, benchmarks, `cog predict` on old CLIs) just as safe.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lassie import sizes
from lassie.errors import InputError

MODELS = ("dev", "schnell")
OUTPUT_FORMATS = ("webp", "jpg", "png")
SCHNELL_MAX_STEPS = 4
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
GO_FAST_LORA_MULTIPLIER = 1.5
SEED_BITS = 32
MAX_SEED = 2**64 - 1


class Mode(str, Enum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


@dataclass(frozen=True)
class Request:
    """The 20 inputs of the public schema, with its defaults."""

    prompt: str
    image: Path | None = None
    mask: Path | None = None
    aspect_ratio: str = "1:1"
    height: int | None = None
    width: int | None = None
    prompt_strength: float = 0.8
    model: str = "dev"
    num_outputs: int = 1
    num_inference_steps: int = 28
    guidance_scale: float = 3.0
    seed: int | None = None
    output_format: str = "webp"
    output_quality: int = 80
    disable_safety_checker: bool = False
    go_fast: bool = False
    megapixels: str = "1"
    lora_scale: float = 1.0
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0


@dataclass(frozen=True)
class Plan:
    """Everything a pipeline call needs, decided; sizes are filled in once images are read."""

    mode: Mode
    model: str
    prompt: str
    num_outputs: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    seed: int
    strength: float
    go_fast: bool
    lora_scale: float
    extra_lora: str | None
    extra_lora_scale: float
    output_format: str
    output_quality: int
    safety_checker: bool
    size: tuple[int, int] | None


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InputError(field, f"must be between {low:g} and {high:g}, got {value:g}")


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(field, f"must be one of {', '.join(allowed)}, got {value!r}")


def validate(request: Request) -> None:
    """Bounds and enums of the schema, each error naming its field."""
    if not isinstance(request.prompt, str):
        raise InputError("prompt", "is required and must be a string")
    _check_choice("model", request.model, MODELS)
    _check_choice("output_format", request.output_format, OUTPUT_FORMATS)
    _check_choice("aspect_ratio", request.aspect_ratio, sizes.aspect_ratios())
    _check_choice("megapixels", request.megapixels, sizes.MEGAPIXELS)
    _check_range("num_outputs", request.num_outputs, 1, 4)
    _check_range("num_inference_steps", request.num_inference_steps, 1, 50)
    _check_range("guidance_scale", request.guidance_scale, 0, 10)
    _check_range("prompt_strength", request.prompt_strength, 0, 1)
    _check_range("output_quality", request.output_quality, 0, 100)
    _check_range("lora_scale", request.lora_scale, -1, 3)
    _check_range("extra_lora_scale", request.extra_lora_scale, -1, 3)
    for field in ("width", "height"):
        side = getattr(request, field)
        if side is not None:
            _check_range(field, side, sizes.MIN_CUSTOM_SIDE, sizes.MAX_SIDE)
    if request.seed is not None:
        _check_range("seed", request.seed, 0, MAX_SEED)
    if request.mask is not None and request.image is None:
        raise InputError("mask", "inpainting needs an `image` too; give both, or neither for text-to-image")
    if request.extra_lora is not None and not request.extra_lora.strip():
        raise InputError("extra_lora", "is empty; leave it out to run without an extra LoRA")


def mode_of(request: Request) -> Mode:
    if request.image is None:
        return Mode.TXT2IMG
    return Mode.INPAINT if request.mask is not None else Mode.IMG2IMG


def go_fast_applies(request: Request) -> bool:
    """The schema runs custom sizes in bf16: go_fast only applies to table sizes and image inputs."""
    custom_txt2img = request.image is None and request.aspect_ratio == sizes.CUSTOM
    return request.go_fast and not custom_txt2img


def effective_lora_scales(lora_scale: float, extra_lora_scale: float, go_fast: bool) -> tuple[float, float]:
    """The schema's 1.5x multiplier on both LoRA scales under go_fast; exact otherwise."""
    factor = GO_FAST_LORA_MULTIPLIER if go_fast else 1.0
    return lora_scale * factor, extra_lora_scale * factor


def txt2img_size(request: Request) -> tuple[int, int]:
    if request.aspect_ratio == sizes.CUSTOM:
        return sizes.custom_size(request.width, request.height)
    return sizes.table_size(request.aspect_ratio, request.megapixels)


def random_seed() -> int:
    return secrets.randbits(SEED_BITS)


def make_plan(request: Request) -> Plan:
    """Validate and decide. Image sizes are known only after decoding, so they stay None here."""
    validate(request)
    mode = mode_of(request)
    fast = go_fast_applies(request)
    lora_scale, extra_scale = effective_lora_scales(request.lora_scale, request.extra_lora_scale, fast)
    schnell = request.model == "schnell"
    steps = min(request.num_inference_steps, SCHNELL_MAX_STEPS) if schnell else request.num_inference_steps
    return Plan(
        mode=mode,
        model=request.model,
        prompt=request.prompt,
        num_outputs=request.num_outputs,
        num_inference_steps=steps,
        guidance_scale=0.0 if schnell else request.guidance_scale,
        max_sequence_length=T5_MAX_LENGTH[request.model],
        seed=random_seed() if request.seed is None else request.seed,
        strength=request.prompt_strength,
        go_fast=fast,
        lora_scale=lora_scale,
        extra_lora=request.extra_lora.strip() if request.extra_lora else None,
        extra_lora_scale=extra_scale,
        output_format=request.output_format,
        output_quality=request.output_quality,
        safety_checker=not request.disable_safety_checker,
        size=txt2img_size(request) if mode is Mode.TXT2IMG else None,
    )
