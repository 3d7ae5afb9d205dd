"""Routing a plan to one batched txt2img / img2img / inpainting pipeline call."""

from __future__ import annotations

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from lassie.engine.prompts import PromptCache, PromptEmbeddings, encode_prompt
from lassie.request.images import Inputs
from lassie.request.plan import Mode, Plan


def generator_for(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same initial noise on every device."""
    return torch.Generator("cpu").manual_seed(seed)


def pipeline_arguments(plan: Plan, inputs: Inputs) -> dict:
    """The exact keyword arguments of the diffusers call, so tests can replay it on bare pipelines.

    `inputs` are at the plan's size already (`Inputs.at(plan.size)`)."""
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
        arguments.update(image=inputs.image, strength=plan.pipeline_strength)
    if plan.mode is Mode.INPAINT:
        arguments.update(mask_image=inputs.mask)
    return arguments


def encoded_arguments(plan: Plan, inputs: Inputs, embeddings: PromptEmbeddings) -> dict:
    """`pipeline_arguments` with the prompt already encoded: the same call, the same images.

    One prompt for N images becomes N copies of its embeddings and one image each, which is
    exactly how diffusers batches `num_images_per_prompt` (same latents shape, same noise).
    """
    arguments = pipeline_arguments(plan, inputs)
    del arguments["prompt"]
    arguments.update(embeddings.for_outputs(plan.num_outputs), num_images_per_prompt=1)
    return arguments


def generate(pipeline: DiffusionPipeline, plan: Plan, inputs: Inputs,
             prompts: PromptCache | None = None) -> list[Image.Image]:
    """Encode the prompt (from `prompts`, the cache, when given), then run the pipeline on it.

    prompt_strength 0 destroys none of the input image (the schema's 1.0 destroys all of it) and
    runs no step, which diffusers refuses: each output is then the input image at the output size."""
    if plan.mode is not Mode.TXT2IMG and plan.steps_run == 0:
        return [inputs.image.copy() for _ in range(plan.num_outputs)]
    with torch.inference_mode():
        encode = prompts.encode if prompts is not None else encode_prompt
        embeddings = encode(pipeline, plan.prompt, plan.max_sequence_length)
        return pipeline(**encoded_arguments(plan, inputs, embeddings)).images
