"""The attention backend choice and its fallback, and the VAE in channels_last: same numbers."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.models.attention_dispatch import AttentionBackendName

from helpers import library_log
from lassie.engine.attention import (
    CUDNN,
    FLASH_3,
    NATIVE,
    AttentionChoice,
    asked_attention,
    choose_attention,
    use_attention,
)
from lassie.engine.hardware import DeviceInfo
from lassie.engine.models import load_models, prepare_for_speed
from lassie.settings import SettingError
from lassie.weights.layout import WeightsLayout

NONE: frozenset[str] = frozenset()
FA3 = frozenset({"flash_attn_3"})


@pytest.mark.parametrize(("kind", "capability", "installed", "backend"), [
    ("cpu", None, NONE, NATIVE),
    ("cpu", None, FA3, NATIVE),
    ("rocm", (9, 4), FA3, NATIVE),
    ("cuda", (9, 0), FA3, FLASH_3),
    ("cuda", (9, 0), NONE, CUDNN),
    ("cuda", (10, 0), FA3, CUDNN),
    ("cuda", (8, 0), FA3, CUDNN),
    ("cuda", (8, 9), NONE, CUDNN),
    ("cuda", (7, 5), NONE, NATIVE),
])
def test_the_fastest_backend_the_device_has(kind, capability, installed, backend):
    choice = choose_attention(kind, capability, installed)
    assert choice.backend == backend and choice.reason


def backends(transformer: torch.nn.Module) -> set:
    return {module.processor._attention_backend for module in transformer.modules()
            if hasattr(getattr(module, "processor", None), "_attention_backend")}


@pytest.fixture
def transformer(tiny_weights):
    """A fresh tiny dev transformer; the process's active backend is native again afterwards."""
    model = FluxTransformer2DModel.from_pretrained(tiny_weights / "flux-dev" / "transformer")
    yield model
    model.set_attention_backend(NATIVE)


def transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return transformer(
            hidden_states=torch.randn(1, 64, 64, generator=generator),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([3.0]),
            img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3),
        ).sample


def test_a_working_backend_is_used_with_the_same_numbers(transformer, caplog):
    before = transformer_output(transformer)
    with caplog.at_level(logging.INFO, logger="lassie"), library_log("diffusers") as messages:
        assert use_attention([transformer], AttentionChoice("_native_flash", "torch's flash kernel")) == "_native_flash"
    assert not messages, "diffusers' 'experimental feature' warning is dropped"
    assert backends(transformer) == {AttentionBackendName._NATIVE_FLASH}
    assert "attention: _native_flash (torch's flash kernel)" in caplog.text
    torch.testing.assert_close(transformer_output(transformer), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [CUDNN, FLASH_3])
def test_an_unavailable_backend_falls_back_to_native_with_the_reason(transformer, caplog, backend):
    """On the CPU cuDNN's kernel does not exist and FlashAttention 3 is not installed."""
    before = transformer_output(transformer)
    with caplog.at_level(logging.INFO, logger="lassie"):
        assert use_attention([transformer], AttentionChoice(backend, "fastest")) == NATIVE
    assert backends(transformer) == {AttentionBackendName.NATIVE}
    assert f"attention: native ({backend} is unavailable: " in caplog.text
    assert torch.equal(transformer_output(transformer), before)


def test_a_gpu_plan_on_this_cpu_falls_back_and_puts_the_vae_in_channels_last(tiny_weights, caplog):
    """prepare_for_speed as a Hopper would run it: cuDNN attention fails its check here and falls
    back; the VAE decodes in channels_last to the contiguous VAE's numbers."""
    models = load_models(WeightsLayout(tiny_weights), DeviceInfo(kind="cpu"))
    reference = AutoencoderKL.from_pretrained(tiny_weights / "flux-dev" / "vae")
    with caplog.at_level(logging.INFO, logger="lassie"):
        prepare_for_speed(models, DeviceInfo(kind="cuda", name="H100", capability=(9, 0)), attention="auto")
    models.transformers["dev"].set_attention_backend(NATIVE)
    assert f"attention: native ({CUDNN} is unavailable" in caplog.text
    vae = models.base.vae
    convolutions = [module for module in vae.modules() if isinstance(module, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)
    assert not all(conv.weight.is_contiguous() for conv in convolutions)
    latents = torch.randn(2, 16, 32, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decoded, expected = vae.decode(latents).sample, reference.decode(latents).sample
    assert decoded.shape == (2, 3, 256, 192)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention, says", [("native", "attention: native (LASSIE_ATTENTION_BACKEND=native)"),
                                              ("auto", "attention: native (torch's native SDPA on cpu)")])
def test_on_the_cpu_nothing_changes(tiny_weights, caplog, attention, says):
    models = load_models(WeightsLayout(tiny_weights), DeviceInfo(kind="cpu"))
    with caplog.at_level(logging.INFO, logger="lassie"):
        prepare_for_speed(models, DeviceInfo(kind="cpu"), attention=attention)
    assert says in caplog.text
    assert all(module.weight.is_contiguous() for module in models.base.vae.modules()
               if isinstance(module, torch.nn.Conv2d))
    assert backends(models.transformers["dev"]) == {None}


def test_the_default_is_native_and_an_unknown_backend_fails_setup_naming_the_variable():
    assert asked_attention("native", "cuda", (9, 0), frozenset({"flash_attn_3"})).backend == NATIVE
    assert asked_attention("auto", "cuda", (9, 0), frozenset({"flash_attn_3"})).backend == FLASH_3
    assert asked_attention(CUDNN, "cpu", None, frozenset()).backend == CUDNN
    with pytest.raises(SettingError, match=r"LASSIE_ATTENTION_BACKEND must be auto or one of .*native.*'flashy'"):
        asked_attention("flashy", "cuda", (9, 0), frozenset())
