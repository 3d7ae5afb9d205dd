"""Text encoding: encoded embeddings give diffusers' own images, every request encodes its prompt,
and long prompts log one short line instead of the cut-off text."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

from conftest import settings_for
from helpers import assert_equal_but_for_rounding, library_log, reference_images, run
from lassie.engine.generate import encode_prompt
from lassie.predictor import Lassie

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
    lassie = Lassie(settings_for(tiny_weights))
    lassie.setup()
    return lassie


def test_every_request_encodes_its_prompt(predictor):
    base = predictor.models.base
    with encoder_calls(base.text_encoder, base.text_encoder_2) as calls:
        run(predictor, prompt="a photo of LSSIE", num_inference_steps=1)
        run(predictor, prompt="a photo of LSSIE", num_inference_steps=1)
    assert calls == [2, 2]


def test_encoded_embeddings_give_diffusers_own_images(predictor, reference):
    """The pipeline called with the encoded prompt equals diffusers called with `prompt=`, pixel for
    pixel (but for float32 rounding), for a batch of two; two requests' images are bitwise equal."""
    fields = dict(prompt="an encoded photo of LSSIE", num_outputs=2)
    expected = reference_images(reference(FluxPipeline, lora_scale=1.0), prompt=fields["prompt"],
                                num_images_per_prompt=2)
    first, second = run(predictor, **fields), run(predictor, **fields)
    for outputs in (first, second):
        for output, reference_output in zip(outputs, expected, strict=True):
            assert_equal_but_for_rounding(output, reference_output)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


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
