"""Text encoding: cached embeddings give diffusers' own images, skip both encoders, never go stale
under text-encoder LoRAs, and long prompts log one short line instead of the cut-off text."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from safetensors.torch import save_file

from conftest import settings_for
from helpers import assert_equal_but_for_rounding, library_log, reference_images, run
from lassie.engine.adapters import LoraAdapters
from lassie.engine.prompts import PromptCache, encode_prompt
from lassie.predictor import Lassie
from make_tiny_weights import linear_sizes, random_lora

LONG_PROMPT = ("a photo of a dog in the snow, " * 4000)[:100_000]


@contextmanager
def encoder_calls(*encoders: torch.nn.Module) -> Iterator[list[int]]:
    """Forward calls of each encoder while the block runs, counted by forward hooks."""
    counts = [0] * len(encoders)

    def counter(index: int):
        def hook(*_: object) -> None:
            counts[index] += 1
        return hook

    handles = [encoder.register_forward_hook(counter(index)) for index, encoder in enumerate(encoders)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def predictor(tiny_weights):
    """A predictor with the prompt cache on (`LASSIE_PROMPT_CACHE`; off by default)."""
    lassie = Lassie(settings_for(tiny_weights, LASSIE_PROMPT_CACHE="1"))
    lassie.setup()
    return lassie


def test_without_the_switch_every_request_encodes_its_prompt(tiny_weights):
    lassie = Lassie(settings_for(tiny_weights))
    lassie.setup()
    base = lassie.models.base
    assert lassie.models.prompts is None
    with encoder_calls(base.text_encoder, base.text_encoder_2) as calls:
        run(lassie, prompt="a photo of LSSIE", num_inference_steps=1)
        run(lassie, prompt="a photo of LSSIE", num_inference_steps=1)
    assert calls == [2, 2]


def test_cached_embeddings_give_diffusers_own_images(predictor, reference):
    """The first request encodes, the second reuses the embeddings: both equal diffusers called with
    `prompt=`, pixel for pixel (but for float32 rounding), for a batch of two; the two requests'
    images are bitwise equal."""
    fields = dict(prompt="a cached photo of LSSIE", num_outputs=2)
    expected = reference_images(reference(FluxPipeline, lora_scale=1.0), prompt=fields["prompt"],
                                num_images_per_prompt=2)
    first, second = run(predictor, **fields), run(predictor, **fields)
    for outputs in (first, second):
        for output, reference_output in zip(outputs, expected, strict=True):
            assert_equal_but_for_rounding(output, reference_output)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_a_repeated_prompt_skips_both_text_encoders(predictor):
    base = predictor.models.base
    fields = dict(prompt="a photo of LSSIE counted by hooks", num_inference_steps=1)
    with encoder_calls(base.text_encoder, base.text_encoder_2) as calls:
        run(predictor, **fields)
    assert calls == [1, 1]
    with encoder_calls(base.text_encoder, base.text_encoder_2) as calls:
        run(predictor, **fields)
        run(predictor, **fields, lora_scale=0.5, seed=3, num_outputs=2)
    assert calls == [0, 0], "the Lassie LoRA has no text-encoder part: scales and seeds share embeddings"
    with encoder_calls(base.text_encoder, base.text_encoder_2) as calls:
        run(predictor, **fields, model="schnell")
    assert calls == [1, 1], "schnell encodes 256 T5 tokens, not dev's 512: another entry"


def test_the_cache_is_bounded_and_drops_the_least_recently_used(tiny_weights):
    pipe = FluxPipeline.from_pretrained(tiny_weights / "flux-dev")
    cache = PromptCache(entries=2)
    with torch.inference_mode():
        cache.encode(pipe, "one", 512)
        cache.encode(pipe, "two", 512)
        cache.encode(pipe, "one", 512)
        cache.encode(pipe, "three", 512)
        assert len(cache) == 2
        with encoder_calls(pipe.text_encoder) as calls:
            cache.encode(pipe, "one", 512)
            cache.encode(pipe, "three", 512)
        assert calls == [0]
        with encoder_calls(pipe.text_encoder) as calls:
            cache.encode(pipe, "two", 512)
        assert calls == [1]


def clip_lora(text_encoder: torch.nn.Module, transformer: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA with a CLIP part (every attention projection) and one transformer layer, PEFT keys."""
    clip = [name for name, _ in text_encoder.named_modules() if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    return {**random_lora(linear_sizes(text_encoder, clip), seed, scale=1.0, prefix="text_encoder"),
            **random_lora(linear_sizes(transformer, ["transformer_blocks.0.attn.to_q"]), seed, scale=1.0)}


def test_a_clip_lora_at_two_scales_never_gets_stale_embeddings(tiny_weights, tmp_path):
    """Each scale, adapter set and re-loaded adapter gets the embeddings a fresh encode gives."""
    pipe = FluxPipeline.from_pretrained(tiny_weights / "flux-dev")
    adapters = LoraAdapters({"dev": pipe.transformer}, pipe.text_encoder)
    for seed in (1, 2):
        save_file(clip_lora(pipe.text_encoder, pipe.transformer, seed), tmp_path / f"clip-{seed}.safetensors")
    cache = PromptCache()

    def cached_and_fresh() -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's pooled embedding, from the cache and freshly encoded."""
        with torch.inference_mode():
            cached, fresh = cache.encode(pipe, "a dog", 512), encode_prompt(pipe, "a dog", 512)
        return cached.pooled_prompt_embeds, fresh.pooled_prompt_embeds

    base, _ = cached_and_fresh()
    adapters.add("clip", tmp_path / "clip-1.safetensors")
    seen = [base]
    for scale in (0.5, 1.5, 0.5):
        adapters.activate("dev", {"clip": scale})
        cached, fresh = cached_and_fresh()
        assert torch.equal(cached, fresh)
        seen.append(cached)
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[1], base)
    assert torch.equal(seen[3], seen[1])
    adapters.activate("dev", {})
    assert torch.equal(cached_and_fresh()[0], base)
    adapters.remove("clip")
    adapters.add("clip", tmp_path / "clip-2.safetensors")
    adapters.activate("dev", {"clip": 0.5})
    cached, fresh = cached_and_fresh()
    assert torch.equal(cached, fresh) and not torch.equal(cached, seen[1])


@pytest.mark.parametrize("pipeline_class", [FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline])
def test_a_long_prompt_logs_one_line_of_token_counts(tiny_weights, caplog, pipeline_class):
    """Each FLUX pipeline module warns from its own copy of the encoding code and its own logger."""
    pipe = pipeline_class.from_pretrained(tiny_weights / "flux-dev")
    with library_log("diffusers", "transformers") as messages, caplog.at_level(logging.INFO, logger="lassie"), \
            torch.inference_mode():
        embeddings = encode_prompt(pipe, LONG_PROMPT, 256)
    tokens = embeddings.tokens
    assert (tokens.clip_kept, tokens.t5_kept) == (77, 256) and min(tokens.clip_total, tokens.t5_total) > 10_000
    assert embeddings.prompt_embeds.shape[1] == 256
    assert f"CLIP kept 77 of {tokens.clip_total} tokens, T5 kept 256 of {tokens.t5_total}" in caplog.text
    assert len("".join(messages)) < 300, [message[:200] for message in messages]


def test_a_long_prompt_through_the_server_keeps_its_logs_short(cog_server):
    status, body = cog_server.predict({"prompt": LONG_PROMPT, "num_inference_steps": 1, "megapixels": "0.25"})
    assert status == 200 and body["status"] == "succeeded", body.get("error")
    logs = body["logs"]
    assert "CLIP kept 77 of " in logs and "T5 kept 512 of " in logs
    assert "truncated" not in logs and "Token indices" not in logs
    assert len(logs) < 3000, logs[:3000]
