"""One batched pipeline call per plan, its prompt encoded first by the pipeline's own `encode_prompt`, whose truncation
warnings (the whole cut-off text: 100 kB for a long prompt) become one line of the tokens CLIP and T5 kept."""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass

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


@dataclass(frozen=True)
class PromptEmbeddings:
    """One prompt's embeddings, batch 1, as the pipeline's `encode_prompt` returns them."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    tokens: TokenCounts


def encode_prompt(pipeline: DiffusionPipeline, prompt: str, max_sequence_length: int) -> PromptEmbeddings:
    """The pipeline's own encoding, its truncation warnings dropped on the loggers that emit them: the pipeline class's
    module (each FLUX pipeline module has its own copy of the encoding code) and transformers' tokenizers."""
    clip_total = len(pipeline.tokenizer(prompt, verbose=False).input_ids)
    t5_total = len(pipeline.tokenizer_2(prompt, verbose=False).input_ids)
    tokens = TokenCounts(min(clip_total, pipeline.tokenizer_max_length), clip_total,
                         min(t5_total, max_sequence_length), t5_total)
    with dropping({type(pipeline).__module__: (TRUNCATION_WARNING,), TOKENIZER_LOGGER: (TOO_LONG_WARNING,)}):
        embeds, pooled, _ = pipeline.encode_prompt(prompt=prompt, max_sequence_length=max_sequence_length)
    log.info("prompt: CLIP kept %d of %d tokens, T5 kept %d of %d", *astuple(tokens))
    return PromptEmbeddings(embeds, pooled, tokens)


def pipeline_arguments(plan: Plan, inputs: Inputs) -> dict:
    """The exact keyword arguments of the diffusers call, so tests can replay it on bare pipelines. `inputs` are at
    the plan's size already. The generator is on the CPU: the same seed gives the same noise on every device."""
    width, height = plan.size
    arguments = dict(prompt=plan.prompt, width=width, height=height, num_inference_steps=plan.num_inference_steps,
                     guidance_scale=plan.guidance_scale, num_images_per_prompt=plan.num_outputs,
                     max_sequence_length=plan.max_sequence_length,
                     generator=torch.Generator("cpu").manual_seed(plan.seed), output_type="pil")
    if plan.mode is not Mode.TXT2IMG:
        arguments.update(image=inputs.image, strength=plan.pipeline_strength)
    if plan.mode is Mode.INPAINT:
        arguments.update(mask_image=inputs.mask)
    return arguments


def generate(pipeline: DiffusionPipeline, plan: Plan, inputs: Inputs) -> list[Image.Image]:
    """Encode the prompt, then run the pipeline on N copies of its embeddings and one image each: exactly how diffusers
    batches `num_images_per_prompt` (same latents, same noise). prompt_strength 0 (the schema's 1.0 destroys all of the
    input image) runs no step, which diffusers refuses: each output is the input image at the output size."""
    if plan.mode is not Mode.TXT2IMG and plan.steps_run == 0:
        return [inputs.image.copy() for _ in range(plan.num_outputs)]
    with torch.inference_mode():
        embeddings = encode_prompt(pipeline, plan.prompt, plan.max_sequence_length)
        arguments = pipeline_arguments(plan, inputs)
        del arguments["prompt"]
        arguments.update(prompt_embeds=embeddings.prompt_embeds.repeat(plan.num_outputs, 1, 1),
                         pooled_prompt_embeds=embeddings.pooled_prompt_embeds.repeat(plan.num_outputs, 1),
                         num_images_per_prompt=1)
        return pipeline(**arguments).images
