"""Loading FLUX dev and schnell once, sharing the VAE, text encoders and tokenizers: pipelines (dev or schnell x
txt2img / img2img / inpainting) are light views over the same modules, so nothing is loaded or held twice."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from lassie.engine.hardware import DeviceInfo
from lassie.request.plan import Mode
from lassie.weights.layout import WeightsLayout

log = logging.getLogger(__name__)

PIPELINE_CLASSES: dict[Mode, type[DiffusionPipeline]] = {
    Mode.TXT2IMG: FluxPipeline, Mode.IMG2IMG: FluxImg2ImgPipeline, Mode.INPAINT: FluxInpaintPipeline}


@dataclass
class FluxModels:
    """The loaded modules: `transformers` and `schedulers` by model name (dev, schnell)."""

    base: FluxPipeline
    transformers: dict[str, FluxTransformer2DModel]
    schedulers: dict[str, FlowMatchEulerDiscreteScheduler]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.base.text_encoder

    def pipeline(self, model: str, mode: Mode, transformer: FluxTransformer2DModel | None = None) -> DiffusionPipeline:
        """A pipeline over the shared modules, `transformer` (e.g. a go_fast copy) in the model's place. Built per call
        (about a millisecond): a cache would keep dropped go_fast copies alive; a fresh scheduler carries no step state
        from the last call. No denoising bar: in logs it is carriage returns; the plan's line has the steps."""
        components = dict(self.base.components)
        components["transformer"] = transformer if transformer is not None else self.transformers[model]
        components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(self.schedulers[model].config)
        pipeline = PIPELINE_CLASSES[mode](**components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


def load_models(layout: WeightsLayout, device: DeviceInfo, vae_slicing: bool = False) -> FluxModels:
    """Weights go straight to `device` in its dtype (`device_map`), never staged whole in host memory first.
    `vae_slicing` decodes a batch one image at a time (the memory plan's call)."""
    device_map = device.torch_device.type
    log.info("loading FLUX.1 dev from %s (%s, %s)", layout.dev_dir, device.torch_device, device.dtype)
    base = FluxPipeline.from_pretrained(layout.dev_dir, dtype=device.dtype, device_map=device_map)
    log.info("loading FLUX.1 schnell transformer from %s", layout.schnell_dir)
    schnell = FluxTransformer2DModel.from_pretrained(layout.schnell_dir / "transformer", dtype=device.dtype,
                                                     device_map=device_map)
    if vae_slicing:
        base.vae.enable_slicing()
    schedulers = {"dev": base.scheduler,
                  "schnell": FlowMatchEulerDiscreteScheduler.from_pretrained(layout.schnell_dir / "scheduler")}
    return FluxModels(base=base, transformers={"dev": base.transformer, "schnell": schnell}, schedulers=schedulers)


def prepare_for_speed(models: FluxModels, hardware: DeviceInfo) -> None:
    """On GPUs the VAE in channels_last, the layout cuDNN's convolutions run fastest in (same numbers within float
    rounding); CPUs keep the contiguous layout diffusers' pipelines use, image for image. Attention stays SDPA."""
    if hardware.is_gpu:
        models.base.vae.to(memory_format=torch.channels_last)
        log.info("VAE in channels_last")
