"""A request (the schema's fields) becomes a validated `Plan`: every decision about a prediction (mode, size, steps,
seed, effective LoRA scales, precision) is made here, testable without models, logged in one place."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from lassie.request import sizes
from lassie.request.bounds import BOUNDS, check_choice, check_range
from lassie.request.errors import EXTRA_LORA_FIELD, InputError

SCHNELL_MAX_STEPS = 4
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
GO_FAST_LORA_MULTIPLIER = 1.5
INTEGER_FIELDS = ("height", "width", "num_outputs", "num_inference_steps", "seed", "output_quality")


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
    """Everything a pipeline call needs, decided once: for image inputs, after the image is decoded."""

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
    size: tuple[int, int]
    input_size: tuple[int, int] | None = None

    @property
    def steps_skipped(self) -> int:
        """Steps of the schedule img2img and inpainting leave out before denoising starts."""
        return 0 if self.mode is Mode.TXT2IMG else skipped_steps(self.num_inference_steps, self.strength)

    @property
    def steps_run(self) -> int:
        return self.num_inference_steps - self.steps_skipped

    @property
    def pipeline_strength(self) -> float:
        """The `strength` that makes the diffusers pipeline skip `steps_skipped` steps: the request's own where its
        rounding already does (every default-step request), else one its `get_timesteps` turns into that many."""
        steps, skipped = self.num_inference_steps, self.steps_skipped
        if diffusers_skipped_steps(steps, self.strength) == skipped:
            return self.strength
        return (steps - skipped - 0.5) / steps


def diffusers_skipped_steps(num_inference_steps: int, strength: float) -> int:
    """Steps diffusers' FLUX img2img and inpainting pipelines skip for `strength` (their `get_timesteps`): int(n - n *
    strength) of n, so 0.8 of 28 steps skips 5 and runs 23, but 0.8 of 4 skips none."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init_timestep, 0))


def skipped_steps(num_inference_steps: int, strength: float) -> int:
    """diffusers' rounding, except that a strength below 1 never starts from pure noise: where n * (1 - strength) < 1
    diffusers skips no step and the input image is lost (schnell's 4 steps at the default 0.8), so denoising starts
    one step into the schedule instead. Only 1.0 starts from pure noise; 0 runs no step at all."""
    skipped = diffusers_skipped_steps(num_inference_steps, strength)
    return skipped if strength >= 1 else max(skipped, 1)


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    return num_inference_steps - skipped_steps(num_inference_steps, strength)


def describe(plan: Plan) -> str:
    """The log line saying what runs: size, the steps that really run, for image inputs their size and strength."""
    width, height = plan.size
    outputs = f"{plan.num_outputs} output(s)"
    if plan.mode is Mode.TXT2IMG:
        return f"size {width}x{height}, {plan.steps_run} steps, {outputs}"
    source = "x".join(map(str, plan.input_size))
    steps = plan.num_inference_steps
    one_step_in = plan.steps_skipped > diffusers_skipped_steps(steps, plan.strength)
    why = f"one step in: {steps} x {1 - plan.strength:.3g} < 1 would start from pure noise"
    if plan.steps_run == 0:
        leaves = f"{why}, which leaves none; " if one_step_in else ""
        start = f" ({leaves}the input image comes back unchanged)"
    elif plan.steps_skipped == 0:
        start = ", from pure noise"
    else:
        start = f", from step {plan.steps_skipped + 1}" + (f" ({why})" if one_step_in else "")
    return (f"{plan.mode.value} from a {source} input image: size {width}x{height}, prompt_strength "
            f"{plan.strength} runs {plan.steps_run} of {steps} steps{start}, {outputs}")


def checked(request: Request) -> Request:
    """Every field error, before any image is decoded; integer fields as ints. JSON Schema counts 2.0 as an integer
    and so does the Cog server, which hands the float on (and integers beyond 64 bits); torch and Pillow want ints."""
    if not isinstance(request.prompt, str):
        raise InputError("prompt", "is required and must be a string")
    check_choice("model", request.model)
    check_choice("output_format", request.output_format)
    check_choice("aspect_ratio", request.aspect_ratio, sizes.aspect_ratios())
    check_choice("megapixels", request.megapixels)
    for field in BOUNDS:
        if getattr(request, field) is not None or field not in ("width", "height", "seed"):
            check_range(field, getattr(request, field))
    if request.mask is not None and request.image is None:
        raise InputError("mask", "inpainting needs an `image` too; give both, or neither for text-to-image")
    if request.extra_lora is not None and not request.extra_lora.strip():
        raise InputError(EXTRA_LORA_FIELD, "is empty; leave it out to run without an extra LoRA")
    floats = {field: getattr(request, field) for field in INTEGER_FIELDS if isinstance(getattr(request, field), float)}
    for field, value in floats.items():
        if not value.is_integer():
            raise InputError(field, f"must be a whole number, got {value}")
    return replace(request, **{field: int(value) for field, value in floats.items()})


def go_fast_applies(request: Request) -> bool:
    """The schema runs custom sizes in bf16: go_fast only applies to table sizes and image inputs."""
    return request.go_fast and not (request.image is None and request.aspect_ratio == sizes.CUSTOM)


def effective_lora_scales(lora_scale: float, extra_lora_scale: float, go_fast: bool) -> tuple[float, float]:
    """The schema's 1.5x multiplier on both LoRA scales under go_fast; exact otherwise."""
    factor = GO_FAST_LORA_MULTIPLIER if go_fast else 1.0
    return lora_scale * factor, extra_lora_scale * factor


def random_seed() -> int:
    return secrets.randbits(32)


def make_plan(request: Request, image_size: tuple[int, int] | None = None) -> Plan:
    """Validate and decide everything, once. `image_size` is the decoded input image's (width, height): a path does
    not tell it, so image inputs are planned after decoding and text-to-image without it."""
    request = checked(request)
    if (image_size is None) != (request.image is None):
        raise TypeError("make_plan takes image_size exactly when the request has an image")
    fast = go_fast_applies(request)
    lora_scale, extra_scale = effective_lora_scales(request.lora_scale, request.extra_lora_scale, fast)
    schnell = request.model == "schnell"
    if request.image is not None:  # image inputs keep the decoded image's shape
        size = sizes.size_from_image(*image_size)
    elif request.aspect_ratio == sizes.CUSTOM:
        size = sizes.custom_size(request.width, request.height)
    else:
        size = sizes.table_size(request.aspect_ratio, request.megapixels)
    steps = min(request.num_inference_steps, SCHNELL_MAX_STEPS) if schnell else request.num_inference_steps
    return Plan(
        mode=Mode.TXT2IMG if request.image is None else Mode.INPAINT if request.mask is not None else Mode.IMG2IMG,
        model=request.model, prompt=request.prompt, num_outputs=request.num_outputs, num_inference_steps=steps,
        guidance_scale=0.0 if schnell else request.guidance_scale, max_sequence_length=T5_MAX_LENGTH[request.model],
        seed=random_seed() if request.seed is None else request.seed, strength=request.prompt_strength,
        go_fast=fast, lora_scale=lora_scale, extra_lora=request.extra_lora.strip() if request.extra_lora else None,
        extra_lora_scale=extra_scale, output_format=request.output_format, output_quality=request.output_quality,
        safety_checker=not request.disable_safety_checker, size=size, input_size=image_size,
    )
