"""The Lassie LoRA merged into the weights at setup (`LASSIE_MERGE_LASSIE`, with idle adapters off:
`LASSIE_ADAPTERS_WHEN_NEEDED`): the default request runs no LoRA work per step.

bf16 variants hold Lassie at 1.0, go_fast copies at go_fast's 1.5; any other scale runs the
difference through the Lassie adapter, so every scale stays exactly linear. Compared with
diffusers' own pipeline (the LoRA loaded the usual way) on float images, within float32 rounding.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

import lassie.engine.adapters as adapters_module
import make_tiny_weights
from conftest import settings_for
from helpers import running_adapters
from lassie.engine.go_fast import FastMode, quantize_transformer
from lassie.engine.variants import LASSIE_ADAPTER, MERGED_LASSIE_SCALE, Variant
from lassie.predictor import Lassie
from lassie.request.plan import Mode
from lassie.weights.layout import WeightsLayout

DEV, DEV_FAST = Variant("dev", False), Variant("dev", True)
MERGED = {"LASSIE_MERGE_LASSIE": "1", "LASSIE_ADAPTERS_WHEN_NEEDED": "1"}
FP8 = {"LASSIE_GO_FAST_MODE": "fp8-weight-only", **MERGED}
# float32 images in [0, 1]: merged and adapter paths differ by about 2e-6 here; the Lassie LoRA
# moves the image by 0.3 and more.
ATOL = 1e-5


def float_image(pipeline) -> np.ndarray:
    return pipeline(prompt="a photo of LSSIE", width=256, height=256, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]


def served_image(lassie: Lassie, variant: Variant, lassie_scale: float) -> np.ndarray:
    """The float image of `variant` readied for a request's (effective) Lassie scale."""
    transformer = lassie.variants.ready(variant, lassie_scale, None, 1.0)
    return float_image(lassie.models.pipeline(variant.model, Mode.TXT2IMG, transformer))


@pytest.fixture(scope="module")
def diffusers_at(reference):
    """diffusers' dev pipeline with the Lassie LoRA as a named adapter, at a given scale."""
    pipe = reference(FluxPipeline, lora_scale=1.0)

    def at(scale: float) -> np.ndarray:
        pipe.set_adapters("lassie", scale)
        return float_image(pipe)

    return at


@pytest.fixture(scope="module")
def predictor(tiny_weights):
    """This module's bf16 predictor: Lassie merged, idle adapters off."""
    lassie = Lassie(settings_for(tiny_weights, **MERGED))
    lassie.setup()
    return lassie


@pytest.fixture(scope="module")
def fp8_predictor(tiny_weights):
    lassie = Lassie(settings_for(tiny_weights, **FP8))
    lassie.setup()
    return lassie


def test_the_default_request_runs_no_lassie_adapter_and_equals_diffusers_at_one(predictor, diffusers_at):
    image = served_image(predictor, DEV, 1.0)
    assert running_adapters(predictor.models.transformers["dev"]) == set()
    np.testing.assert_allclose(image, diffusers_at(1.0), rtol=0, atol=ATOL)
    assert np.abs(image - diffusers_at(0.0)).max() > 1000 * ATOL


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0, -1.0, 1.5])
def test_other_scales_run_the_difference_and_equal_diffusers_at_that_scale(predictor, diffusers_at, scale):
    image = served_image(predictor, DEV, scale)
    assert running_adapters(predictor.models.transformers["dev"]) == {LASSIE_ADAPTER}
    np.testing.assert_allclose(image, diffusers_at(scale), rtol=0, atol=ATOL)


def test_alternating_scales_never_change_the_base_weights(predictor, fp8_predictor):
    for lassie, variant in ((predictor, DEV), (fp8_predictor, DEV_FAST)):
        transformer = lassie.variants.transformer(variant)
        before = {key: value.clone() for key, value in transformer.state_dict().items() if ".lora_" not in key}
        first = served_image(lassie, variant, 0.7)
        for step in range(50):
            lassie.variants.ready(variant, (-1.0, 1.0, 2.5, 1.5, 0.0)[step % 5], None, 1.0)
        assert np.array_equal(served_image(lassie, variant, 0.7), first)
        after = transformer.state_dict()
        assert all(bitwise_equal(value, after[key]) for key, value in before.items())


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, also for torchao's Float8Tensor (its fp8 data and scales)."""
    if hasattr(a, "qdata"):
        return torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def fused_fp8_reference(tiny_weights):
    """diffusers' dev pipeline with the Lassie LoRA fused at 1.5 by diffusers, then quantized as the
    go_fast copies are: what the go_fast copy's base weights must be."""
    pipe = FluxPipeline.from_pretrained(tiny_weights / "flux-dev")
    pipe.load_lora_weights(str(tiny_weights / "lassie" / "lora.safetensors"), adapter_name="lassie")
    pipe.fuse_lora(lora_scale=MERGED_LASSIE_SCALE[True])
    pipe.unload_lora_weights()
    pipe.transformer = quantize_transformer(pipe.transformer, FastMode.FP8_WEIGHT_ONLY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_default_go_fast_request_runs_no_lassie_adapter_on_the_go_fast_copy(fp8_predictor, fused_fp8_reference):
    image = served_image(fp8_predictor, DEV_FAST, MERGED_LASSIE_SCALE[True])
    transformer = fp8_predictor.variants.transformer(DEV_FAST)
    assert type(transformer.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Float8Tensor"
    assert running_adapters(transformer) == set()
    np.testing.assert_allclose(image, float_image(fused_fp8_reference), rtol=0, atol=ATOL)
    # the shared bf16 weights still hold Lassie at 1.0
    assert running_adapters(fp8_predictor.models.transformers["dev"]) == set()
    served_image(fp8_predictor, DEV, 1.0)
    assert running_adapters(fp8_predictor.models.transformers["dev"]) == set()


def test_other_go_fast_scales_run_the_difference_on_the_go_fast_copy(fp8_predictor, fused_fp8_reference):
    """The delta adapter runs unquantized beside the fp8 weights (merged at 1.5): at 1.5 + d it adds d."""
    transformer = fp8_predictor.variants.transformer(DEV_FAST)
    served_image(fp8_predictor, DEV_FAST, 0.6)
    assert running_adapters(transformer) == {LASSIE_ADAPTER}
    assert float(transformer.transformer_blocks[0].attn.to_q.scaling[LASSIE_ADAPTER]) == pytest.approx(0.6 - 1.5)


def copy_of_weights(tiny_weights: Path, directory: Path, lassie_lora: dict[str, torch.Tensor]) -> Path:
    """The tiny weights with another Lassie LoRA (the big model files are linked, not copied)."""
    shutil.copytree(tiny_weights, directory, copy_function=lambda src, dst: Path(dst).symlink_to(src),
                    ignore=shutil.ignore_patterns("lora-cache"))
    (directory / "lassie" / "lora.safetensors").unlink()
    save_file(lassie_lora, WeightsLayout(directory).lassie_lora)
    return directory


def test_a_lassie_lora_on_shared_linears_gets_go_fast_weights_of_its_own(tiny_weights, tmp_path):
    """The AdaLN linear stays bf16 and is shared with the bf16 transformer: where Lassie adapts it,
    the go_fast copy holds its own weight, merged at 1.5, and the bf16 one keeps 1.0."""
    transformer = FluxTransformer2DModel.from_pretrained(tiny_weights / "flux-dev" / "transformer")
    adaln = "transformer_blocks.0.norm1.linear"
    targets = [*make_tiny_weights.lassie_targets(transformer), adaln]
    lora = make_tiny_weights.random_lora(make_tiny_weights.linear_sizes(transformer, targets), seed=31)
    lassie = Lassie(settings_for(copy_of_weights(tiny_weights, tmp_path / "weights", lora), **FP8))
    lassie.setup()
    bf16, fast = lassie.variants.transformer(DEV), lassie.variants.transformer(DEV_FAST)
    base = transformer.get_submodule(adaln).weight
    up, down = lora[f"transformer.{adaln}.lora_B.weight"], lora[f"transformer.{adaln}.lora_A.weight"]
    delta = up @ down  # alpha/r is 1 for files without alphas
    bf16_weight = bf16.get_submodule(adaln).base_layer.weight
    fast_weight = fast.get_submodule(adaln).base_layer.weight
    assert fast_weight.data_ptr() != bf16_weight.data_ptr()
    torch.testing.assert_close(bf16_weight, base + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast_weight, base + 1.5 * delta, rtol=0, atol=1e-6)
    shared = "transformer_blocks.0.norm1_context.linear"
    assert fast.get_submodule(shared).weight.data_ptr() == bf16.get_submodule(shared).weight.data_ptr()


class FailingAdd:
    """Stands in for the merge's weight + scale x delta: each merge fails on its `at`-th layer (from 1);
    putting layers back (a negative scale) works."""

    def __init__(self, at: int) -> None:
        self.at, self.layers = at, 0
        self.add = adapters_module._with_delta

    def __call__(self, weight, delta, scale):
        if scale > 0:
            self.layers += 1
            if self.layers == self.at:
                self.layers = 0
                raise RuntimeError("out of memory while merging")
        return self.add(weight, delta, scale)


@pytest.mark.parametrize("at", [1, 5])
def test_a_merge_that_fails_leaves_lassie_an_adapter_at_the_request_scale(tiny_weights, reference, monkeypatch,
                                                                        caplog, at):
    """Failing on the first layer or part-way (the layers done are put back), setup still succeeds."""
    original = FluxTransformer2DModel.from_pretrained(tiny_weights / "flux-dev" / "transformer").state_dict()
    monkeypatch.setattr(adapters_module, "_with_delta", FailingAdd(at))
    lassie = Lassie(settings_for(tiny_weights, **FP8))
    with caplog.at_level(logging.WARNING, logger="lassie"):
        lassie.setup()
    monkeypatch.undo()
    failures = [record.getMessage() for record in caplog.records if "merging the Lassie LoRA" in record.getMessage()]
    assert len(failures) == 2 and all("out of memory while merging" in line for line in failures)  # dev, schnell
    transformer = lassie.models.transformers["dev"]
    weights = {key.replace(".base_layer.", "."): value for key, value in transformer.state_dict().items()
               if ".lora_" not in key}
    for key, value in original.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0 if at == 1 else 1e-6)
    image = served_image(lassie, DEV, 1.0)
    assert running_adapters(transformer) == {LASSIE_ADAPTER}
    expected = float_image(reference(FluxPipeline, lora_scale=1.0))
    if at == 1:
        assert np.array_equal(image, expected)
    np.testing.assert_allclose(image, expected, rtol=0, atol=ATOL)
    served_image(lassie, DEV_FAST, MERGED_LASSIE_SCALE[True])
    assert running_adapters(lassie.variants.transformer(DEV_FAST)) == {LASSIE_ADAPTER}


def test_a_lassie_text_encoder_part_stays_an_adapter_at_the_request_scale(tiny_weights, tmp_path):
    """The text encoder runs per prompt, not per step: its Lassie part is not merged."""
    encoder = CLIPTextModel.from_pretrained(tiny_weights / "flux-dev" / "text_encoder")
    encoder_linears = [f"encoder.layers.0.self_attn.{name}" for name in ("q_proj", "v_proj")]
    transformer = FluxTransformer2DModel.from_pretrained(tiny_weights / "flux-dev" / "transformer")
    lora = {**make_tiny_weights.lassie_lora_state_dict(transformer),
            **make_tiny_weights.random_lora(make_tiny_weights.linear_sizes(encoder, encoder_linears), seed=32,
                                            prefix="text_encoder")}
    lassie = Lassie(settings_for(copy_of_weights(tiny_weights, tmp_path / "weights", lora), **MERGED))
    lassie.setup()
    original = encoder.get_submodule(encoder_linears[0]).weight
    layer = lassie.models.text_encoder.get_submodule(encoder_linears[0])
    for scale in (1.0, 0.5):
        lassie.variants.ready(DEV, scale, None, 1.0)
        assert running_adapters(lassie.models.text_encoder) == {LASSIE_ADAPTER}
        assert float(layer.scaling[LASSIE_ADAPTER]) == pytest.approx(scale)
        assert torch.equal(layer.base_layer.weight, original)
    assert running_adapters(lassie.models.transformers["dev"]) == {LASSIE_ADAPTER}  # at 0.5: the delta runs


def test_merged_with_idle_adapters_on_runs_the_delta_at_zero_and_equals_diffusers(tiny_weights, diffusers_at):
    """`LASSIE_MERGE_LASSIE` alone: the delta adapter always runs (one graph set), at 0 by default."""
    lassie = Lassie(settings_for(tiny_weights, LASSIE_MERGE_LASSIE="1"))
    lassie.setup()
    transformer = lassie.models.transformers["dev"]
    for scale in (1.0, 0.5):
        image = served_image(lassie, DEV, scale)
        assert running_adapters(transformer) == {LASSIE_ADAPTER}
        assert float(transformer.transformer_blocks[0].attn.to_q.scaling[LASSIE_ADAPTER]) == pytest.approx(scale - 1.0)
        np.testing.assert_allclose(image, diffusers_at(scale), rtol=0, atol=ATOL)
