"""go_fast on CPU: the 1.5x LoRA multiplier, the fallback's log line, and the quantized path.

The quantized path is driven on CPU with LASSIE_GO_FAST_MODE=fp8-weight-only: the same torchao
Float8Tensor weights and PEFT-on-torchao adapters the GPU's dynamic fp8 path uses.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from bench_gpu import image_psnr
from conftest import settings_for
from helpers import tiny_lora
from lassie.engine.generate import Inputs, generate
from lassie.engine.variants import LASSIE_ADAPTER, Variant
from lassie.predictor import Lassie
from lassie.request.plan import Mode, Request, make_plan

DEV = Variant("dev", False)

BASE = {"prompt": "a photo of LSSIE", "num_inference_steps": 2, "megapixels": "0.25", "seed": 3,
        "output_format": "png"}


def image_of(predictor: Lassie, **fields) -> np.ndarray:
    (path,) = predictor.predict(Request(**{**BASE, **fields}))
    return np.asarray(Image.open(path).convert("RGB"))


def lassie_scaling(transformer: torch.nn.Module) -> float:
    """The scale PEFT applies to the Lassie adapter (alpha/r is 1 for the trainer's files): the
    request's Lassie scale (unmerged by default; merged, see tests/test_lassie_merged.py)."""
    return float(transformer.transformer_blocks[0].attn.to_q.scaling[LASSIE_ADAPTER])


def test_go_fast_runs_the_lassie_adapter_at_one_and_a_half_times_the_scale(predictor):
    image_of(predictor, go_fast=True, lora_scale=0.4)
    assert lassie_scaling(predictor.models.transformers["dev"]) == pytest.approx(0.6)
    image_of(predictor, go_fast=False, lora_scale=0.4)
    assert lassie_scaling(predictor.models.transformers["dev"]) == pytest.approx(0.4)


def test_on_cpu_go_fast_equals_the_bf16_path_at_the_multiplied_scales(predictor):
    assert np.array_equal(image_of(predictor, go_fast=True, lora_scale=0.4),
                          image_of(predictor, go_fast=False, lora_scale=0.6))
    assert not np.array_equal(image_of(predictor, go_fast=True, lora_scale=0.4),
                              image_of(predictor, go_fast=False, lora_scale=0.4))


def test_custom_sizes_run_without_the_multiplier(predictor):
    custom = {"aspect_ratio": "custom", "width": 512, "height": 512}
    assert np.array_equal(image_of(predictor, go_fast=True, lora_scale=0.4, **custom),
                          image_of(predictor, go_fast=False, lora_scale=0.4, **custom))


def test_the_log_says_which_precision_ran_and_why(tiny_weights, caplog):
    """A fresh predictor: the reason is logged once per (model, go_fast, precision) and process."""
    lassie = Lassie(settings_for(tiny_weights))
    with caplog.at_level(logging.INFO, logger="lassie"):
        lassie.setup()
        image_of(lassie, go_fast=True, model="schnell")
        image_of(lassie, go_fast=True, model="schnell")
    assert caplog.text.count("precision: float32") == 2
    why = "schnell with go_fast=true runs float32 (go_fast: no GPU here, so no fp8 matmul; running the unquantized"
    assert caplog.text.count(why) == 1


@pytest.fixture(scope="module")
def fp8_predictor(tiny_weights):
    lassie = Lassie(settings_for(tiny_weights, LASSIE_GO_FAST_MODE="fp8-weight-only"))
    lassie.setup()
    return lassie


def test_quantized_path_applies_adapters_at_the_multiplied_scale(fp8_predictor, caplog):
    with caplog.at_level(logging.INFO, logger="lassie"):
        go_fast_image = image_of(fp8_predictor, go_fast=True, lora_scale=0.4)
    assert "precision: fp8" in caplog.text
    transformer = fp8_predictor.variants.transformer(Variant("dev", True))
    assert transformer is not fp8_predictor.models.transformers["dev"]
    assert lassie_scaling(transformer) == pytest.approx(0.6)
    assert type(transformer.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Float8Tensor"

    plan = make_plan(Request(**{**BASE, "go_fast": True, "lora_scale": 0.4}))
    fp8_predictor.variants.adapters.activate(Variant("dev", True), {LASSIE_ADAPTER: 0.6})
    pipeline = fp8_predictor.models.pipeline("dev", Mode.TXT2IMG, transformer)
    direct = np.asarray(generate(pipeline, plan, Inputs())[0])
    assert np.array_equal(go_fast_image, direct)


def test_quantized_image_stays_close_to_full_precision(fp8_predictor):
    """fp8 (e4m3) keeps 3 mantissa bits: weights are off by up to ~6%, so the image drifts but must
    stay recognisably the same picture. 20 dB PSNR is far above two unrelated noise images
    (about 8-11 dB here) and well below identity."""
    go_fast_image = image_of(fp8_predictor, go_fast=True, lora_scale=1 / 1.5)
    full = image_of(fp8_predictor, go_fast=False, lora_scale=1.0)
    other_seed = image_of(fp8_predictor, go_fast=False, lora_scale=1.0, seed=4)
    assert image_psnr(full, other_seed) < 15
    assert 20 < image_psnr(full, go_fast_image) < float("inf")


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_quantized_path_serves_every_mode_with_an_extra_lora(fp8_predictor, services, model, tmp_path):
    photo = tmp_path / "photo.png"
    Image.effect_noise((320, 256), 50).convert("RGB").save(photo)
    mask = tmp_path / "mask.png"
    Image.new("L", (320, 256), 255).save(mask)
    url = services.serve("/fast/lora.safetensors", tiny_lora(41))
    for inputs in ({}, {"image": photo}, {"image": photo, "mask": mask}):
        without = image_of(fp8_predictor, go_fast=True, model=model, **inputs)
        assert without.shape == ((256, 320, 3) if inputs else (512, 512, 3))
        assert not np.array_equal(image_of(fp8_predictor, go_fast=True, model=model, extra_lora=url, **inputs),
                                  without)


from fake_services import services  # noqa: E402,F401 (fixture)
