"""What stays resident on the GPU, and whether the worst request the schema allows still fits beside it
(docs/go_fast.md, "Memory plan"): when nothing fits, setup fails with the memory it needs, never an OOM in a request."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers as hf
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors import safe_open
from torch import nn

from lassie.engine.go_fast import is_token_linear
from lassie.weights.layout import WeightsLayout

GIB = 2**30
BF16_BYTES = 2
FP8_BYTES = 1

WORST_SIZE = (1440, 1440)
WORST_OUTPUTS = 4
TEXT_TOKENS = 512
PATCH_PIXELS = 16
# Measured: AutoencoderKL decode of FLUX latents in bf16 peaks at about 1.8 GiB per output megapixel.
VAE_DECODE_BYTES_PER_MEGAPIXEL = 1.8 * GIB
# Estimated, not yet measured: live bf16 (tokens x hidden) tensors inside one FLUX block (residual streams, normed
# input, q/k/v, attention output, the 4x MLP hidden state and its activation).
BLOCK_ACTIVATION_TENSORS = 16
# CUDA context, cuBLAS/cuDNN workspaces, compile workspaces and allocator fragmentation.
RESERVED_BYTES = 3 * GIB
# Kept free beyond the worst request's estimated working memory: the estimate is not yet measured.
HEADROOM_BYTES = 2 * GIB
MIN_SLOT_RANK = 32
# Without the Lassie LoRA file (the plan made from configs alone): a LoRA of this rank on every linear, the most
# Replicate's FLUX LoRA trainer makes (rank 16 is its default).
LASSIE_RANK_BOUND = 128


@dataclass(frozen=True)
class Footprint:
    """Parameter counts of the modules that stay on the device, and what the variants add."""

    transformer_parameters: dict[str, int]
    token_linear_parameters: int
    slot_parameters_per_rank: int
    text_encoder_parameters: int
    vae_parameters: int
    safety_parameters: int
    hidden_size: int
    lassie_parameters: int  # the Lassie LoRA's tensors (see LASSIE_RANK_BOUND)

    def resident_bytes(self, go_fast_copies: bool, slot_rank: int) -> int:
        """bf16 modules, fp8 go_fast copies, each transformer's slot and Lassie adapter (its text-encoder part too)."""
        transformers = len(self.transformer_parameters) * (2 if go_fast_copies else 1)
        total = (sum(self.transformer_parameters.values()) + self.text_encoder_parameters + self.vae_parameters
                 + self.safety_parameters) * BF16_BYTES
        if go_fast_copies:
            total += len(self.transformer_parameters) * self.token_linear_parameters * FP8_BYTES
        return total + transformers * (slot_rank * self.slot_parameters_per_rank + self.lassie_parameters) * BF16_BYTES

    def working_bytes(self, size: tuple[int, int], outputs: int, vae_slicing: bool) -> int:
        """Peak working memory of one request: denoising and VAE decode run one after the other."""
        width, height = size
        tokens = (width // PATCH_PIXELS) * (height // PATCH_PIXELS) + TEXT_TOKENS
        denoising = outputs * tokens * self.hidden_size * BF16_BYTES * BLOCK_ACTIVATION_TENSORS
        decoded_megapixels = width * height / 1e6 * (1 if vae_slicing else outputs)
        return max(denoising, int(decoded_megapixels * VAE_DECODE_BYTES_PER_MEGAPIXEL))

    def plan(self, go_fast_copies: bool, vae_slicing: bool, slot_rank: int, reason: str = "") -> MemoryPlan:
        return MemoryPlan(go_fast_copies, vae_slicing, slot_rank, self.resident_bytes(go_fast_copies, slot_rank),
                          self.working_bytes(WORST_SIZE, WORST_OUTPUTS, vae_slicing), reason)


@dataclass(frozen=True)
class MemoryPlan:
    go_fast_copies: bool
    vae_slicing: bool
    slot_rank: int  # 0 is no slot
    resident_bytes: int
    worst_request_bytes: int
    reason: str

    @property
    def needed_bytes(self) -> int:
        return self.resident_bytes + self.worst_request_bytes + RESERVED_BYTES + HEADROOM_BYTES


class InsufficientMemory(RuntimeError):
    pass


def plan_memory(device_bytes: int | None, footprint: Footprint, quantizes: bool, slot_rank: int) -> MemoryPlan:
    """The fastest arrangement that fits `device_bytes` (None is host memory: everything stays). Candidates, fastest
    first: go_fast copies resident before none; for each, VAE slicing (the same images, a fraction of the memory)
    before ever narrower slots (`narrower_rank`)."""
    if device_bytes is None:
        return footprint.plan(quantizes, False, slot_rank, "host memory: every variant stays resident")
    ranks = [slot_rank]
    while (rank := narrower_rank(ranks[-1])) is not None:
        ranks.append(rank)
    plans = [footprint.plan(copies, slicing, rank) for copies in ([True, False] if quantizes else [False])
             for slicing, rank in [(False, slot_rank)] + [(True, rank) for rank in ranks]]
    for plan in plans:
        if plan.needed_bytes <= device_bytes:
            return replace(plan, reason=_reason(plan, device_bytes, quantizes, slot_rank))
    leanest = plans[-1]
    raise InsufficientMemory(
        f"this GPU has {device_bytes / GIB:.1f} GiB; lassie needs at least {leanest.needed_bytes / GIB:.1f} GiB "
        f"(bf16 dev + schnell with their LoRA adapters, text encoders, VAE and safety models: "
        f"{leanest.resident_bytes / GIB:.1f} GiB; the largest request: {leanest.worst_request_bytes / GIB:.1f} GiB; "
        f"reserve {RESERVED_BYTES / GIB:.0f} GiB and headroom {HEADROOM_BYTES / GIB:.0f} GiB)")


def narrower_rank(slot_rank: int) -> int | None:
    """The slot's rank halved, or None when it would fall below `MIN_SLOT_RANK`: 128 -> 64 -> 32."""
    half = slot_rank // 2
    return half if half >= MIN_SLOT_RANK else None


def _reason(plan: MemoryPlan, device_bytes: int, quantizes: bool, asked_rank: int) -> str:
    parts = [f"{plan.resident_bytes / GIB:.1f} GiB resident + {plan.worst_request_bytes / GIB:.1f} GiB for the "
             f"largest request of {device_bytes / GIB:.1f} GiB"]
    if quantizes:
        parts.append("go_fast copies resident" if plan.go_fast_copies else "no room for go_fast copies: go_fast runs bf16")
    if plan.vae_slicing:
        parts.append("VAE decodes one image at a time")
    if plan.slot_rank != asked_rank:
        parts.append(f"hot-swap slot narrowed to rank {plan.slot_rank} (LoRAs up to rank {plan.slot_rank})")
    return "memory plan: " + "; ".join(parts)


def parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@dataclass(frozen=True)
class ModelConfigs:
    """The config files that size every resident module."""

    transformers: dict[str, Path]
    t5: Path
    clip: Path
    vae: Path
    compvis: Path
    falcon: Path
    lassie_lora: Path | None = None  # None: sized by LASSIE_RANK_BOUND

    @classmethod
    def of_layout(cls, layout: WeightsLayout, lassie_lora: Path) -> ModelConfigs:
        """The weights about to be loaded, so the plan is known before anything reaches the GPU."""
        dev, config = layout.dev_dir, "config.json"
        return cls({"dev": dev / "transformer" / config, "schnell": layout.schnell_dir / "transformer" / config},
                   t5=dev / "text_encoder_2" / config, clip=dev / "text_encoder" / config, vae=dev / "vae" / config,
                   compvis=layout.compvis_dir / config, falcon=layout.falcon_dir / config, lassie_lora=lassie_lora)


def footprint_from_configs(configs: ModelConfigs) -> Footprint:
    """Every resident module built on the meta device from its config (no memory, a few seconds at full size), counted
    without LoRA adapters: those are counted per transformer."""
    with torch.device("meta"):
        transformers = {model: FluxTransformer2DModel.from_config(_read(path))
                        for model, path in configs.transformers.items()}
        text_encoders = [hf.T5EncoderModel(hf.T5Config(**_read(configs.t5))),
                         hf.CLIPTextModel(hf.CLIPTextConfig(**_read(configs.clip)))]
        vae = AutoencoderKL.from_config(_read(configs.vae))
        safety = [StableDiffusionSafetyChecker(hf.CLIPConfig(**_read(configs.compvis))),
                  hf.ViTForImageClassification(hf.ViTConfig(**_read(configs.falcon)))]
    first = next(iter(transformers.values()))
    linears = [(name, module) for name, module in first.named_modules() if isinstance(module, nn.Linear)]
    per_rank = sum(module.in_features + module.out_features for _, module in linears)
    return Footprint(
        transformer_parameters={model: parameters(transformer) for model, transformer in transformers.items()},
        token_linear_parameters=sum(module.weight.numel() for name, module in linears if is_token_linear(module, name)),
        slot_parameters_per_rank=per_rank, text_encoder_parameters=sum(map(parameters, text_encoders)),
        vae_parameters=parameters(vae), safety_parameters=sum(map(parameters, safety)),
        hidden_size=first.config.num_attention_heads * first.config.attention_head_dim,
        lassie_parameters=(LASSIE_RANK_BOUND * per_rank if configs.lassie_lora is None
                           else lora_parameters(configs.lassie_lora)))


def lora_parameters(path: Path) -> int:
    """Every tensor of a LoRA file, counted from its header (nothing is read into memory)."""
    with safe_open(path, framework="pt") as lora:
        return sum(math.prod(lora.get_slice(key).get_shape()) for key in lora.keys())


def _read(path: Path) -> dict:
    return json.loads(path.read_text())
