"""The VAE in channels_last on GPUs (same numbers), nothing changed on the CPU, attention left at
diffusers' default."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from lassie.engine.hardware import DeviceInfo
from lassie.engine.models import load_models, prepare_for_speed
from lassie.weights.layout import WeightsLayout


def backends(transformer: torch.nn.Module) -> set:
    return {module.processor._attention_backend for module in transformer.modules()
            if hasattr(getattr(module, "processor", None), "_attention_backend")}


def test_a_gpu_plan_on_this_cpu_puts_the_vae_in_channels_last(tiny_weights):
    """prepare_for_speed as a Hopper would run it: the VAE decodes in channels_last to the
    contiguous VAE's numbers, and attention stays diffusers' default."""
    models = load_models(WeightsLayout(tiny_weights), DeviceInfo(kind="cpu"))
    reference = AutoencoderKL.from_pretrained(tiny_weights / "flux-dev" / "vae")
    prepare_for_speed(models, DeviceInfo(kind="cuda", name="H100", capability=(9, 0)))
    assert backends(models.transformers["dev"]) == {None}
    vae = models.base.vae
    convolutions = [module for module in vae.modules() if isinstance(module, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)
    assert not all(conv.weight.is_contiguous() for conv in convolutions)
    latents = torch.randn(2, 16, 32, 24, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decoded, expected = vae.decode(latents).sample, reference.decode(latents).sample
    assert decoded.shape == (2, 3, 256, 192)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


def test_on_the_cpu_nothing_changes(tiny_weights):
    models = load_models(WeightsLayout(tiny_weights), DeviceInfo(kind="cpu"))
    prepare_for_speed(models, DeviceInfo(kind="cpu"))
    assert all(module.weight.is_contiguous() for module in models.base.vae.modules()
               if isinstance(module, torch.nn.Conv2d))
    assert backends(models.transformers["dev"]) == {None}
