"""Routing a plan to one batched txt2img / img2img / inpainting pipeline call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from lassie.request import Mode, Plan


@dataclass(frozen=True)
class Inputs:
    """Decoded user images, already at the output size."""

    image: Image.Image | None = None
    mask: Image.Image | None = None


def generator_for(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same initial noise on every device."""
    return torch.Generator("cpu").manual_seed(seed)


def pipeline_arguments(plan: Plan, inputs: Inputs) -> dict:
    """The exact keyword arguments of the diffusers call, so tests can replay it on bare pipelines."""
    width, height = plan.size
    arguments = dict(
        prompt=plan.prompt,
        width=width,
        height=height,
        num_inference_steps=plan.num_inference_steps,
        guidance_scale=plan.guidance_scale,
        num_images_per_prompt=plan.num_outputs,
        max_sequence_length=plan.max_sequence_length,
        generator=generator_for(plan.seed),
        output_type="pil",
    )
    if plan.mode is not Mode.TXT2IMG:
        arguments.update(image=inputs.image, strength=plan.strength)
    if plan.mode is Mode.INPAINT:
        arguments.update(mask_image=inputs.mask)
    return arguments


def generate(pipeline: DiffusionPipeline, plan: Plan, inputs: Inputs) -> list[Image.Image]:
    """prompt_strength 0 destroys none of the input image (the schema's 1.0 destroys all of it) and
    runs no step, which diffusers refuses: each output is then the input image at the output size."""
    if plan.mode is not Mode.TXT2IMG and plan.steps_run == 0:
        return [inputs.image.copy() for _ in range(plan.num_outputs)]
    with torch.inference_mode():
        return pipeline(**pipeline_arguments(plan, inputs)).images
