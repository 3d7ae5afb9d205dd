"""Routing a plan to one batched txt2img / img2img / inpainting pipeline call, its prompt encoded first.

diffusers does the encoding (the pipeline's own `encode_prompt`: same tokenizers, truncation and
dtypes as a `prompt=` call); the pipeline is then called with `prompt_embeds`. diffusers' own
truncation warnings quote the whole cut-off text (about 100 kB for a 100,000 character prompt,
repeated in the response's logs): they are dropped by their exact opening and replaced by one
line of how many tokens CLIP and T5 kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from lassie.quiet import dropping
from lassie.request.images import Inputs
from lassie.request.plan import Mode, Plan

log = logging.getLogger(__name__)

TRUNCATION_WARNING = "The following part of your input was truncated because"
TOO_LONG_WARNING = "Token indices sequence length is longer than the specified maximum sequence length"
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


@dataclass(frozen=True)
class TokenCounts:
    """Tokens each encoder kept of the prompt's total, start and end markers included."""

    clip_kept: int
    clip_total: int
    t5_kept: int
    t5_total: int

    def describe(self) -> str:
        return f"CLIP kept {self.clip_kept} of {self.clip_total} tokens, T5 kept {self.t5_kept} of {self.t5_total}"


@dataclass(frozen=True)
class PromptEmbeddings:
    """One prompt's embeddings, batch 1, as the pipeline's `encode_prompt` returns them."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    tokens: TokenCounts

    def for_outputs(self, count: int) -> dict[str, torch.Tensor]:
        """The pipeline keywords for `count` images of this prompt: diffusers repeats embeddings it
        computes once per image, but passes given ones through as they are."""
        return dict(prompt_embeds=self.prompt_embeds.repeat(count, 1, 1),
                    pooled_prompt_embeds=self.pooled_prompt_embeds.repeat(count, 1))


def encode_prompt(pipeline: DiffusionPipeline, prompt: str, max_sequence_length: int) -> PromptEmbeddings:
    """The pipeline's own encoding, its truncation warnings dropped on the loggers that emit them:
    the pipeline class's module (each FLUX pipeline module has its own copy of the encoding code)
    and transformers' tokenizers."""
    clip_total = len(pipeline.tokenizer(prompt, verbose=False).input_ids)
    t5_total = len(pipeline.tokenizer_2(prompt, verbose=False).input_ids)
    tokens = TokenCounts(min(clip_total, pipeline.tokenizer_max_length), clip_total,
                         min(t5_total, max_sequence_length), t5_total)
    with dropping({type(pipeline).__module__: (TRUNCATION_WARNING,), TOKENIZER_LOGGER: (TOO_LONG_WARNING,)}):
        prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=max_sequence_length)
    log.info("prompt: %s", tokens.describe())
    return PromptEmbeddings(prompt_embeds, pooled_prompt_embeds, tokens)


def pipeline_arguments(plan: Plan, inputs: Inputs) -> dict:
    """The exact keyword arguments of the diffusers call, so tests can replay it on bare pipelines.

    `inputs` are at the plan's size already (`Inputs.at(plan.size)`). The generator is on the CPU:
    the same seed gives the same initial noise on every device."""
    width, height = plan.size
    arguments = dict(
        prompt=plan.prompt,
        width=width,
        height=height,
        num_inference_steps=plan.num_inference_steps,
        guidance_scale=plan.guidance_scale,
        num_images_per_prompt=plan.num_outputs,
        max_sequence_length=plan.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(plan.seed),
        output_type="pil",
    )
    if plan.mode is not Mode.TXT2IMG:
        arguments.update(image=inputs.image, strength=plan.pipeline_strength)
    if plan.mode is Mode.INPAINT:
        arguments.update(mask_image=inputs.mask)
    return arguments


def generate(pipeline: DiffusionPipeline, plan: Plan, inputs: Inputs) -> list[Image.Image]:
    """Encode the prompt, then run the pipeline on it: one prompt for N images becomes N copies of
    its embeddings and one image each, exactly how diffusers batches `num_images_per_prompt` (same
    latents shape, same noise).

    prompt_strength 0 destroys none of the input image (the schema's 1.0 destroys all of it) and
    runs no step, which diffusers refuses: each output is then the input image at the output size."""
    if plan.mode is not Mode.TXT2IMG and plan.steps_run == 0:
        return [inputs.image.copy() for _ in range(plan.num_outputs)]
    with torch.inference_mode():
        embeddings = encode_prompt(pipeline, plan.prompt, plan.max_sequence_length)
        arguments = pipeline_arguments(plan, inputs)
        del arguments["prompt"]
        arguments.update(embeddings.for_outputs(plan.num_outputs), num_images_per_prompt=1)
        return pipeline(**arguments).images
