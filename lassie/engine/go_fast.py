"""go_fast: the precision a go_fast request runs on this hardware, decided once at setup, and the go_fast copies
(docs/go_fast.md): torchao dynamic float8 where CUDA has fp8 matmuls; elsewhere go_fast=false's weights (fp8
weight-only storage is only slower beside resident bf16). `LASSIE_GO_FAST_MODE` overrides."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from lassie.engine.hardware import DeviceInfo
from lassie.settings import GO_FAST_MODE_ENV

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
QUANTIZED_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


class FastMode(str, Enum):
    FP8_DYNAMIC = "fp8"
    FP8_WEIGHT_ONLY = "fp8-weight-only"
    UNQUANTIZED = "unquantized"


PRECISION_NAMES = {
    FastMode.FP8_DYNAMIC: "fp8 (torchao dynamic float8 activations and weights)",
    FastMode.FP8_WEIGHT_ONLY: "fp8 weight-only storage (matmuls in the activations' dtype)",
}


@dataclass(frozen=True)
class GoFastPlan:
    """How go_fast runs here; `reason` is the line setup logs."""

    mode: FastMode
    reason: str

    @property
    def quantizes(self) -> bool:
        return self.mode is not FastMode.UNQUANTIZED


def requested_mode(setting: str) -> FastMode | None:
    """`Settings.go_fast_mode` (validated there): `auto` lets the hardware decide."""
    return None if setting == "auto" else FastMode(setting)


def plan_go_fast(device: DeviceInfo, requested: FastMode | None = None) -> GoFastPlan:
    """The precision go_fast runs on `device`, and whether it needs go_fast copies of the transformers."""
    fp8 = device.kind == "cuda" and device.capability is not None and device.capability >= FP8_MIN_CAPABILITY
    if requested is FastMode.FP8_WEIGHT_ONLY or (fp8 and requested is not FastMode.UNQUANTIZED):
        mode = requested or FastMode.FP8_DYNAMIC
        note = f" ({GO_FAST_MODE_ENV}=fp8-weight-only)" if mode is FastMode.FP8_WEIGHT_ONLY else ""
        return GoFastPlan(mode, f"go_fast: {PRECISION_NAMES[mode]} on {device.describe()}{note}")
    asked = f"{GO_FAST_MODE_ENV}=fp8 cannot be honoured: " if requested is FastMode.FP8_DYNAMIC else ""
    if requested is FastMode.UNQUANTIZED:
        reason = (f"go_fast: quantization is off ({GO_FAST_MODE_ENV}=unquantized); running the same weights as "
                  "go_fast=false")
    elif not device.is_gpu:
        reason = (f"{asked}go_fast: no GPU here, so no fp8 matmul; running the unquantized weights "
                  "(same as go_fast=false)")
    elif device.kind == "rocm":
        reason = f"{asked}go_fast: fp8 is not set up for ROCm GPUs ({device.describe()}); running bf16 weights"
    else:
        reason = (f"{asked}go_fast: this GPU ({device.describe()}) has no fp8 matmul (needs "
                  f"{'.'.join(map(str, FP8_MIN_CAPABILITY))}+); running bf16 weights, the same as go_fast=false "
                  "(fp8 weight-only storage would only be slower)")
    return GoFastPlan(FastMode.UNQUANTIZED, reason)


def decide_go_fast(wanted: GoFastPlan, copies_fit: bool, memory_reason: str,
                   build_failure: str | None = None) -> GoFastPlan:
    """The one go_fast decision: `wanted` if the memory plan holds its copies and they were built, else bf16."""
    if not wanted.quantizes:
        return wanted
    if not copies_fit:
        return GoFastPlan(FastMode.UNQUANTIZED, f"{wanted.reason}; {memory_reason}")
    if build_failure is not None:
        return GoFastPlan(FastMode.UNQUANTIZED, f"go_fast: {wanted.mode.value} failed at setup ({build_failure})")
    return wanted


def is_token_linear(module: nn.Module, name: str) -> bool:
    """The linears that multiply every token: 8.6 B of FLUX's 11.9 B weights. The AdaLN modulation (`norm*.linear`),
    embedders and final projection stay bf16: they run once per image, where fp8 saves no time, and their outputs
    (every token's scales, shifts and gates) are where quantization error hurts most."""
    return isinstance(module, nn.Linear) and name.startswith(QUANTIZED_BLOCKS) and ".norm" not in name


def quantize_transformer(transformer: nn.Module, mode: FastMode) -> nn.Module:
    """The go_fast copy of a diffusers transformer, the original left as it was. Built on the meta device from the
    original's tensors (without LoRA adapters or compiled wrappers), so it costs only the fp8 weights, never a second
    bf16 copy: attach adapters and compile after. Per-tensor scales: cuBLAS's fastest fp8 kernel, as in the published
    torchao figures. `set_inductor_config=False`: torchao's global inductor settings slow every compile."""
    if mode is FastMode.UNQUANTIZED:
        return transformer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torchao import quantization as ao

    if any(isinstance(m, BaseTunerLayer) and m.merged for m in transformer.modules()):
        raise ValueError("cannot quantize a transformer with fused LoRA weights: the LoRA would be baked in")
    with torch.device("meta"):
        go_fast_copy = type(transformer).from_config(transformer.config)
    weights = {key.replace(".base_layer.", "."): tensor for key, tensor in transformer.state_dict().items()
               if ".lora_" not in key}
    go_fast_copy.load_state_dict(weights, strict=True, assign=True)
    go_fast_copy.train(transformer.training)
    go_fast_copy.requires_grad_(False)
    config = (ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerTensor(), set_inductor_config=False)
              if mode is FastMode.FP8_DYNAMIC else ao.Float8WeightOnlyConfig(set_inductor_config=False))
    for name, module in list(go_fast_copy.named_modules()):
        if is_token_linear(module, name):
            ao.quantize_(module, config)
    return go_fast_copy


@dataclass
class PrecisionLog:
    """One line per (model, go_fast, precision) the first time it runs, never per request."""

    _seen: set[str] = field(default_factory=set)

    def ran(self, model: str, go_fast: bool, plan: GoFastPlan, dtype: torch.dtype) -> str:
        """Returns the precision, for the request's own line."""
        precision = PRECISION_NAMES[plan.mode] if go_fast and plan.quantizes else str(dtype).removeprefix("torch.")
        line = f"{model} with go_fast={str(go_fast).lower()} runs {precision}{f' ({plan.reason})' if go_fast else ''}"
        if line not in self._seen:
            self._seen.add(line)
            log.info("%s", line)
        return precision
