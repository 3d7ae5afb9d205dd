"""Text encoding: the pipeline's own `encode_prompt`, a bounded cache of its results, and one short
log line of how many tokens CLIP and T5 kept.

diffusers does the encoding (same tokenizers, truncation and dtypes as a `prompt=` call); the
pipeline is then called with `prompt_embeds`, so a repeated prompt skips both text encoders.
diffusers' own truncation warnings quote the whole cut-off text (about 100 kB for a 100,000
character prompt, repeated in the response's logs): they are dropped by their exact opening
and replaced by the token counts.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from peft.tuners.lora import LoraLayer

from lassie.quiet import dropping

log = logging.getLogger(__name__)

PROMPT_CACHE_ENTRIES = 64
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
        they are: they come repeated here, as fresh tensors (the cached ones are never handed out).
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


def text_adapter_state(*encoders: torch.nn.Module) -> frozenset:
    """What the LoRAs on the text encoders contribute right now: one (adapter, scale) per layer.

    An adapter is named by a weak reference to its own lora_A module, not by its name: an
    adapter removed and loaded again under the same name is a new module, so it never matches
    an entry made before (a dead weak reference equals only itself). Merged adapters count too,
    they changed the base weights. Disabled layers contribute nothing, as in their forward.
    """
    state = set()
    for encoder in encoders:
        for layer in encoder.modules():
            if not isinstance(layer, LoraLayer) or layer.disable_adapters:
                continue
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    state.add((weakref.ref(layer.lora_A[name]), layer.scaling[name]))
            for name in layer.merged_adapters:
                state.add((weakref.ref(layer.lora_A[name]), "merged"))
    return frozenset(state)


class PromptCache:
    """Embeddings of recent prompts, least recently used dropped first.

    Keyed by everything that changes them: the text encoders (weakly: a reloaded model never
    matches), the prompt, the max sequence length and the LoRAs active on the text encoders at
    their scales (a CLIP LoRA, or the Lassie LoRA's text-encoder part at another lora_scale,
    gives other embeddings). Bounded by entries, not bytes, because every entry has the same
    size: one T5 sequence of at most 512 x 4096 plus a pooled CLIP vector, 4 MiB in bf16 on the
    GPU, so 64 entries hold at most 256 MiB, while 64 covers the prompts a server sees repeated
    (warm-up, retries, seed sweeps, the same prompt at several sizes or LoRAs).
    """

    def __init__(self, entries: int = PROMPT_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._cache: OrderedDict[tuple, PromptEmbeddings] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def encode(self, pipeline: DiffusionPipeline, prompt: str, max_sequence_length: int) -> PromptEmbeddings:
        encoders = (pipeline.text_encoder, pipeline.text_encoder_2)
        key = (*(weakref.ref(encoder) for encoder in encoders), prompt, max_sequence_length,
               text_adapter_state(*encoders))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            log.info("prompt: %s (embeddings cached)", cached.tokens.describe())
            return cached
        embeddings = encode_prompt(pipeline, prompt, max_sequence_length)
        self._cache[key] = embeddings
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)
        return embeddings
