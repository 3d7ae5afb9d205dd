"""Text encoding: the pipeline's own `encode_prompt`, and one short log line of how many tokens
CLIP and T5 kept.

diffusers does the encoding (same tokenizers, truncation and dtypes as a `prompt=` call); the
pipeline is then called with `prompt_embeds`.
diffusers' own truncation warnings quote the whole cut-off text (about 100 kB for a 100,000
character prompt, repeated in the response's logs): they are dropped by their exact opening
and replaced by the token counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from lassie.quiet import dropping

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
        """The pipeline keywords for `count` images of this prompt.

        diffusers repeats embeddings it computes once per image, but passes given ones through as
        they are: they come repeated here.
        """
        return dict(prompt_embeds=self.prompt_embeds.repeat(count, 1, 1),
                    pooled_prompt_embeds=self.pooled_prompt_embeds.repeat(count, 1))


def count_tokens(pipeline: DiffusionPipeline, prompt: str, max_sequence_length: int) -> TokenCounts:
    clip_total = len(pipeline.tokenizer(prompt, verbose=False).input_ids)
    t5_total = len(pipeline.tokenizer_2(prompt, verbose=False).input_ids)
    return TokenCounts(min(clip_total, pipeline.tokenizer_max_length), clip_total,
                       min(t5_total, max_sequence_length), t5_total)


def encode_prompt(pipeline: DiffusionPipeline, prompt: str, max_sequence_length: int) -> PromptEmbeddings:
    """The pipeline's own encoding, with its truncation warnings replaced by one line of counts.

    The warnings are dropped on the loggers that emit them: the pipeline class's module (each
    FLUX pipeline module has its own copy of the encoding code) and transformers' tokenizers.
    """
    tokens = count_tokens(pipeline, prompt, max_sequence_length)
    with dropping({type(pipeline).__module__: (TRUNCATION_WARNING,), TOKENIZER_LOGGER: (TOO_LONG_WARNING,)}):
        prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=max_sequence_length)
    log.info("prompt: %s", tokens.describe())
    return PromptEmbeddings(prompt_embeds, pooled_prompt_embeds, tokens)

