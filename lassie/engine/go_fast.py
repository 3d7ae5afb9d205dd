"""go_fast: which precision a go_fast request runs on this hardware, and building the go_fast copies.

The decision is pure (`plan_go_fast` on a `lassie.engine.hardware.DeviceInfo`), so every hardware case
is unit-tested on CPU.

- CUDA compute capability >= 8.9 (L4, L40S, 4090, H100, H200, B200): torchao dynamic float8
  (activations and weights, per-tensor scales, fp8 tensor-core matmuls).
- Other CUDA GPUs (A100 = 8.0, A10G = 8.6, ...) and ROCm: the bf16 transformer that
  go_fast=false runs. torchao's float8 *weight-only* storage works there, but it dequantizes to
  bf16 before every matmul: slower than bf16, and it saves no memory while the bf16 weights
  stay resident for go_fast=false, so it would only make go_fast slower.
- CPU: the unquantized transformer (the same weights as go_fast=false).
- `LASSIE_GO_FAST_MODE` overrides the choice (`fp8`, `fp8-weight-only`, `unquantized`); `fp8` on
  hardware without fp8 matmul falls back as above. `fp8-weight-only` runs anywhere, CPU included,
  so CPU tests can drive the quantized path (PEFT adapters on torchao weights) end to end.

What stays resident (the go_fast copies, the slot's rank, VAE slicing) is `lassie.engine.memory`'s plan,
computed from the modules' sizes and the GPU's memory.

PEFT LoRA on the fp8 transformer (see docs/go_fast.md for the experiments): PEFT wraps a linear
whose weight is a torchao tensor in `TorchaoLoraLinear`; the base matmul stays fp8 and the LoRA
path runs in the activations' dtype, so scales are exact. Merging (`fuse_lora`) is impossible
there (no re-quantization recipe): adapters stay unfused. The Lassie LoRA is merged before
quantizing instead (`own_weight` of `quantize_transformer`, see `lassie.engine.variants`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def has_fp8_matmul(device: DeviceInfo) -> bool:
    return device.kind == "cuda" and device.capability is not None and device.capability >= FP8_MIN_CAPABILITY


def plan_go_fast(device: DeviceInfo, requested: FastMode | None = None) -> GoFastPlan:
    """The precision go_fast runs on `device`, and whether it needs go_fast copies of the transformers."""
    if requested is FastMode.UNQUANTIZED:
        return _unquantized(f"go_fast: quantization is off ({GO_FAST_MODE_ENV}=unquantized); "
                            "running the same weights as go_fast=false")
    if requested is FastMode.FP8_WEIGHT_ONLY:
        return _quantized(device, FastMode.FP8_WEIGHT_ONLY, f"({GO_FAST_MODE_ENV}=fp8-weight-only)")
    if has_fp8_matmul(device):
        return _quantized(device, FastMode.FP8_DYNAMIC, "")
    asked = f"{GO_FAST_MODE_ENV}=fp8 cannot be honoured: " if requested is FastMode.FP8_DYNAMIC else ""
    return _unquantized(asked + _fallback_reason(device))


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


def torchao_config(mode: FastMode):
    """torchao 0.18 configs. Per-tensor scales for the dynamic path: cuBLAS's fastest fp8 kernel,
    and what the published torchao fp8 numbers used. `set_inductor_config=False` keeps torchao
    from changing global inductor settings (coordinate-descent tuning slows every compile)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerTensor

    if mode is FastMode.FP8_DYNAMIC:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False)
    if mode is FastMode.FP8_WEIGHT_ONLY:
        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"{mode.value} does not quantize")


OwnWeight = Callable[[str, torch.Tensor], torch.Tensor | None]


def quantize_transformer(transformer: nn.Module, mode: FastMode, own_weight: OwnWeight | None = None) -> nn.Module:
    """The go_fast copy of a diffusers transformer; the original is left exactly as it was.

    Not a deep copy: the go_fast copy is built on the meta device and takes the original's tensors
    (LoRA adapters and compiled wrappers left out), so it costs only the fp8 weights, never a
    transient second bf16 copy. Attach adapters and compile after quantizing.

    `own_weight(name, shared)` may give a linear a weight of the copy's own instead of the shared
    one (the Lassie LoRA merged at go_fast's scale): a token linear's is quantized at once, so
    at most one such bf16 weight exists at a time; any other linear keeps it.
    """
    if mode is FastMode.UNQUANTIZED:
        return transformer
    from torchao.quantization import quantize_

    go_fast_copy = _bare_copy(transformer)
    config = torchao_config(mode)
    for name, module in list(go_fast_copy.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        weight = own_weight(name, module.weight) if own_weight else None
        if weight is not None:
            module.weight = nn.Parameter(weight, requires_grad=False)
        if is_token_linear(module, name):
            quantize_(module, config)
    return go_fast_copy


def _bare_copy(transformer: nn.Module) -> nn.Module:
    _refuse_fused_adapters(transformer)
    with torch.device("meta"):
        copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict(_base_weights(transformer), strict=True, assign=True)
    copy.train(transformer.training)
    copy.requires_grad_(False)
    return copy


def _base_weights(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without PEFT: adapter tensors dropped, wrapped layers under their own names."""
    return {
        key.replace(".base_layer.", "."): tensor
        for key, tensor in transformer.state_dict().items()
        if ".lora_" not in key
    }


def _refuse_fused_adapters(transformer: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) and m.merged for m in transformer.modules()):
        raise ValueError("cannot quantize a transformer with fused LoRA weights: the LoRA would be baked in")


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
