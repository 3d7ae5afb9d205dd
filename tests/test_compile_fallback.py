"""A compiled call that fails after warm-up never fails the request.

The predictor compiles with a test-only backend: `aot_eager`'s graphs, wrapped so that each call
is counted (a call that runs compiled is a counted one) and can be made to raise, as a broken
kernel would, once warm-up is done. Its images are compared with the session's eager predictor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.backends.debugging import aot_eager

from conftest import settings_for
from lassie.predictor import Lassie
from lassie.request.plan import Request

BACKEND = "lassie_test_breakable"
# aot_eager's decomposed float32 sums may round differently from eager in the last bit.
PIXEL_TOLERANCE = 1
FIELDS = {"prompt": "a photo of LSSIE", "num_inference_steps": 1, "megapixels": "0.25", "seed": 5,
          "output_format": "png", "go_fast": False}


class Cancelled(BaseException):
    """What a cancelled request raises inside the running call (like cog's CancelationException)."""


class Graphs:
    """The compiled graphs' calls, and what they raise instead of running while `failure` is set."""

    calls = 0
    failure: BaseException | None = None


def breakable_backend(graph_module: torch.fx.GraphModule, example_inputs: list):
    compiled = aot_eager(graph_module, example_inputs)

    def run(*args):
        Graphs.calls += 1
        if Graphs.failure is not None:
            raise Graphs.failure
        return compiled(*args)

    return run


@pytest.fixture(scope="module")
def compiled(tiny_weights: Path) -> Lassie:
    torch._dynamo.register_backend(breakable_backend, name=BACKEND)
    lassie = Lassie(settings_for(tiny_weights, LASSIE_COMPILE="1", LASSIE_COMPILE_BACKEND=BACKEND,
                                 LASSIE_LORA_SLOT_RANK="0"))
    lassie.setup()
    yield lassie
    Graphs.failure = None


def images(lassie: Lassie, **fields) -> list[np.ndarray]:
    return [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
            for path in lassie.predict(Request(**FIELDS, **fields))]


def assert_same_images(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected) > 0
    for actual, wanted in zip(got, expected, strict=True):
        assert actual.shape == wanted.shape and np.abs(actual - wanted).max() <= PIXEL_TOLERANCE


def compiled_calls(run) -> int:
    before = Graphs.calls
    run()
    return Graphs.calls - before


def test_a_cancellation_inside_a_compiled_call_is_not_a_compile_failure(compiled, caplog):
    Graphs.failure = Cancelled()
    with caplog.at_level(logging.WARNING, logger="lassie"), pytest.raises(Cancelled):
        images(compiled, model="schnell")
    Graphs.failure = None
    assert "compiled call failed" not in caplog.text
    assert compiled_calls(lambda: images(compiled, model="schnell")) > 0  # still compiled


def test_a_compiled_call_that_fails_is_served_eagerly_and_that_variant_stays_eager(compiled, predictor, caplog):
    assert compiled_calls(lambda: images(compiled, model="dev")) > 0  # compiled before the failure
    Graphs.failure = RuntimeError("injected kernel failure")
    with caplog.at_level(logging.WARNING, logger="lassie"):
        served = images(compiled, model="dev", num_outputs=2)
    Graphs.failure = None
    assert_same_images(served, images(predictor, model="dev", num_outputs=2))
    warnings = [record.getMessage() for record in caplog.records if "compiled call failed" in record.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: injected kernel failure" in warnings[0]
    assert warnings[0].startswith("dev: ") and "dev runs eagerly from now on" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lassie"):
        assert compiled_calls(lambda: assert_same_images(images(compiled, model="dev", lora_scale=0.4),
                                                         images(predictor, model="dev", lora_scale=0.4))) == 0
        assert compiled_calls(lambda: assert_same_images(images(compiled, model="schnell"),
                                                         images(predictor, model="schnell"))) > 0
    assert not caplog.records  # no second warning: dev is eager, schnell still compiled and well


def test_an_error_that_eager_code_raises_too_leaves_the_variant_compiled(compiled, monkeypatch, caplog):
    """An error raised outside the compiled blocks (here the VAE) is the request's: not run again."""
    decode = []

    def failing_decode(self, *args, **kwargs):
        decode.append(1)
        raise ValueError("the VAE cannot decode this")

    monkeypatch.setattr("diffusers.AutoencoderKL.decode", failing_decode)
    with caplog.at_level(logging.WARNING, logger="lassie"), pytest.raises(ValueError, match="cannot decode"):
        images(compiled, model="schnell")
    monkeypatch.undo()
    assert len(decode) == 1 and "compiled call failed" not in caplog.text
    assert compiled_calls(lambda: images(compiled, model="schnell")) > 0


def test_a_compiled_failure_whose_eager_rerun_fails_too_leaves_the_variant_compiled(compiled, monkeypatch, caplog):
    """The eager run's error is the request's (here the VAE's): raised, and the variant keeps its graphs."""
    def failing_decode(self, *args, **kwargs):
        raise ValueError("the VAE cannot decode this")

    Graphs.failure = RuntimeError("injected kernel failure")
    monkeypatch.setattr("diffusers.AutoencoderKL.decode", failing_decode)
    with caplog.at_level(logging.WARNING, logger="lassie"), pytest.raises(ValueError, match="cannot decode"):
        images(compiled, model="schnell")
    Graphs.failure = None
    monkeypatch.undo()
    warnings = [record.getMessage() for record in caplog.records if "compiled call failed" in record.getMessage()]
    assert warnings == ["schnell: a compiled call failed (RuntimeError: injected kernel failure) and so did the "
                        "same call run eagerly"]
    assert compiled_calls(lambda: images(compiled, model="schnell")) > 0
