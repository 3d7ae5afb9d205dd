"""go_fast: which precision a go_fast request runs on this hardware, and building the go_fast copies.

The decision is pure and made once, at setup, by `decide_go_fast`: from the precision the device
allows (`plan_go_fast`), whether the memory plan (`lassie.engine.memory`) holds go_fast copies, and
whether they could be built. Every case is unit-tested on CPU.

- CUDA compute capability >= 8.9 (L4, L40S, 4090, H100, H200, B200): torchao dynamic float8
  (activations and weights, per-tensor scales, fp8 tensor-core matmuls).
- Other CUDA GPUs (A100, A10G, ...), ROCm and CPU: the weights go_fast=false runs. torchao's
  float8 *weight-only* storage dequantizes to bf16 before every matmul, and saves no memory while
  the bf16 weights stay resident for go_fast=false: it would only make go_fast slower.
- `LASSIE_GO_FAST_MODE` overrides the choice; `fp8` without fp8 matmul falls back as above.
  `fp8-weight-only` runs anywhere, so CPU tests drive the quantized path end to end.

PEFT wraps a linear whose weight is a torchao tensor in `TorchaoLoraLinear`: the base matmul stays
fp8 and the LoRA path runs in the activations' dtype, so scales are exact. Merging is impossible
there (no re-quantization recipe): adapters stay unfused. See docs/go_fast.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
    """How go_fast runs here; `reason` is the one line logged the first time it does."""

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
    if requested is FastMode.UNQUANTIZED:
        return _unquantized(f"go_fast: quantization is off ({GO_FAST_MODE_ENV}=unquantized); "
                            "running the same weights as go_fast=false")
    if requested is FastMode.FP8_WEIGHT_ONLY:
        return _quantized(device, FastMode.FP8_WEIGHT_ONLY, f"({GO_FAST_MODE_ENV}=fp8-weight-only)")
    if device.kind == "cuda" and device.capability is not None and device.capability >= FP8_MIN_CAPABILITY:
        return _quantized(device, FastMode.FP8_DYNAMIC, "")
    asked = f"{GO_FAST_MODE_ENV}=fp8 cannot be honoured: " if requested is FastMode.FP8_DYNAMIC else ""
    return _unquantized(asked + _fallback_reason(device))


def decide_go_fast(wanted: GoFastPlan, copies_fit: bool, memory_reason: str,
                   build_failure: str | None = None) -> GoFastPlan:
    """The one go_fast decision, the record setup logs and requests run by.

    `wanted` is what the device allows (`plan_go_fast`); a quantized go_fast needs its copies, so
    it stands only where the memory plan holds them (`copies_fit`, else `memory_reason` says
    why not) and they were built (`build_failure`: what went wrong when they could not be).
    Otherwise go_fast runs the bf16 transformers, the same as go_fast=false.
    """
    if not wanted.quantizes:
        return wanted
    if not copies_fit:
        return _unquantized(f"{wanted.reason}; {memory_reason}")
    if build_failure is not None:
        return _unquantized(f"go_fast: {wanted.mode.value} failed at setup ({build_failure})")
    return wanted


def _quantized(device: DeviceInfo, mode: FastMode, note: str) -> GoFastPlan:
    return GoFastPlan(mode=mode, reason=f"go_fast: {PRECISION_NAMES[mode]} on {device.describe()} {note}".rstrip())


def _unquantized(reason: str) -> GoFastPlan:
    return GoFastPlan(mode=FastMode.UNQUANTIZED, reason=reason)


def _fallback_reason(device: DeviceInfo) -> str:
    if not device.is_gpu:
        return "go_fast: no GPU here, so no fp8 matmul; running the unquantized weights (same as go_fast=false)"
    if device.kind == "rocm":
        return f"go_fast: fp8 is not set up for ROCm GPUs ({device.describe()}); running bf16 weights"
    needed = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"go_fast: this GPU ({device.describe()}) has no fp8 matmul (needs {needed}+); running bf16 "
            "weights, the same as go_fast=false (fp8 weight-only storage would only be slower)")


def is_token_linear(module: nn.Module, name: str) -> bool:
    """The linears that multiply every image and text token: 8.6 B of FLUX's 11.9 B weights.

    Left in bf16: the AdaLN modulation (`norm*.linear`), embedders and the final projection.
    They run on one vector per image, where fp8 saves no time, and their outputs (the scales,
    shifts and gates every token is modulated with) are where quantization error hurts most.
    """
    return isinstance(module, nn.Linear) and name.startswith(QUANTIZED_BLOCKS) and ".norm" not in name


def quantize_transformer(transformer: nn.Module, mode: FastMode) -> nn.Module:
    """The go_fast copy of a diffusers transformer; the original is left exactly as it was.

    Not a deep copy: the go_fast copy is built on the meta device and takes the original's tensors
    (LoRA adapters and compiled wrappers left out), so it costs only the fp8 weights, never a
    transient second bf16 copy. Attach adapters and compile after quantizing. Per-tensor scales
    for the dynamic path: cuBLAS's fastest fp8 kernel, and what the published torchao fp8 numbers
    used. `set_inductor_config=False` keeps torchao from changing global inductor settings
    (coordinate-descent tuning slows every compile).
    """
    if mode is FastMode.UNQUANTIZED:
        return transformer
    from torchao import quantization as ao

    go_fast_copy = _bare_copy(transformer)
    config = (ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerTensor(), set_inductor_config=False)
              if mode is FastMode.FP8_DYNAMIC else ao.Float8WeightOnlyConfig(set_inductor_config=False))
    for name, module in list(go_fast_copy.named_modules()):
        if is_token_linear(module, name):
            ao.quantize_(module, config)
    return go_fast_copy


def _bare_copy(transformer: nn.Module) -> nn.Module:
    """The transformer without PEFT: adapter tensors dropped, wrapped layers under their own names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and m.merged for m in transformer.modules()):
        raise ValueError("cannot quantize a transformer with fused LoRA weights: the LoRA would be baked in")
    with torch.device("meta"):
        copy = type(transformer).from_config(transformer.config)
    weights = {key.replace(".base_layer.", "."): tensor for key, tensor in transformer.state_dict().items()
               if ".lora_" not in key}
    copy.load_state_dict(weights, strict=True, assign=True)
    copy.train(transformer.training)
    copy.requires_grad_(False)
    return copy


def precision_of(plan: GoFastPlan, go_fast: bool, dtype: torch.dtype) -> str:
    if go_fast and plan.quantizes:
        return PRECISION_NAMES[plan.mode]
    return str(dtype).removeprefix("torch.")


class PrecisionLog:
    """One line per (model, go_fast, precision) the first time it runs, never per request."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def ran(self, model: str, go_fast: bool, plan: GoFastPlan, dtype: torch.dtype) -> None:
        line = f"{model} with go_fast={str(go_fast).lower()} runs {precision_of(plan, go_fast, dtype)}"
        if go_fast:
            line += f" ({plan.reason})"
        if line not in self._seen:
            self._seen.add(line)
            log.info("%s", line)
