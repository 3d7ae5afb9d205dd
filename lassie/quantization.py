"""go_fast: which precision a go_fast request runs on this hardware, the fp8 transformers, compile.

The decision is pure (`plan_go_fast` on a `DeviceInfo`), so every hardware case is unit-tested
on CPU; only `query_device` asks torch about the real machine.

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

What stays resident (the twins, the slot's rank, VAE slicing) is `lassie.memory`'s plan,
computed from the modules' sizes and the GPU's memory.

PEFT LoRA on the fp8 transformer (see docs/go_fast.md for the experiments): PEFT wraps a linear
whose weight is a torchao tensor in `TorchaoLoraLinear`; the base matmul stays fp8 and the LoRA
path runs in the activations' dtype, so scales are exact. Merging (`fuse_lora`) is impossible
there (no re-quantization recipe): adapters stay unfused, which lassie does anyway.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
GO_FAST_MODE_ENV = "LASSIE_GO_FAST_MODE"
COMPILE_ENV = "LASSIE_COMPILE"
COMPILE_BACKEND_ENV = "LASSIE_COMPILE_BACKEND"
DEFAULT_COMPILE_BACKEND = "inductor"
COMPILE_CACHE_ENV = "LASSIE_COMPILE_CACHE"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE_DIRNAME = "compile-cache"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
DEFAULT_COMPILE_MODE = "default"
RECOMPILE_LIMIT = 64
QUANTIZED_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
OFF_VALUES = ("0", "false", "no", "off")
ON_VALUES = ("", "1", "true", "yes", "on")


class FastMode(str, Enum):
    FP8_DYNAMIC = "fp8"
    FP8_WEIGHT_ONLY = "fp8-weight-only"
    UNQUANTIZED = "unquantized"


PRECISION_NAMES = {
    FastMode.FP8_DYNAMIC: "fp8 (torchao dynamic float8 activations and weights)",
    FastMode.FP8_WEIGHT_ONLY: "fp8 weight-only storage (matmuls in the activations' dtype)",
}


@dataclass(frozen=True)
class DeviceInfo:
    """What the go_fast decision needs to know about the accelerator: kind is cuda, rocm or cpu."""

    kind: str
    name: str = "CPU"
    capability: tuple[int, int] | None = None
    total_memory: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "rocm")

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name}, compute capability {self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class GoFastPlan:
    """How go_fast runs here; `reason` is the one line logged the first time it does."""

    mode: FastMode
    reason: str

    @property
    def quantizes(self) -> bool:
        return self.mode is not FastMode.UNQUANTIZED


def query_device() -> DeviceInfo:
    """The real accelerator; the only function here that asks the hardware."""
    if not torch.cuda.is_available():
        return DeviceInfo(kind="cpu")
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        kind="rocm" if torch.version.hip else "cuda",
        name=properties.name,
        capability=torch.cuda.get_device_capability(index),
        total_memory=properties.total_memory,
    )


def requested_mode(value: str | None) -> FastMode | None:
    """`LASSIE_GO_FAST_MODE`: unset or `auto` lets the hardware decide."""
    value = (value or "auto").strip().lower()
    if value == "auto":
        return None
    try:
        return FastMode(value)
    except ValueError:
        allowed = ", ".join(["auto", *(mode.value for mode in FastMode)])
        raise ValueError(f"{GO_FAST_MODE_ENV} must be one of {allowed}, got {value!r}") from None


def has_fp8_matmul(device: DeviceInfo) -> bool:
    return device.kind == "cuda" and device.capability is not None and device.capability >= FP8_MIN_CAPABILITY


def plan_go_fast(device: DeviceInfo, requested: FastMode | None = None) -> GoFastPlan:
    """The precision go_fast runs on `device`, and whether its quantized copies stay resident."""
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


def quantize_transformer(transformer: nn.Module, mode: FastMode) -> nn.Module:
    """A quantized twin of a diffusers transformer; the original is left exactly as it was.

    Not a deep copy: the twin is built on the meta device and takes the original's tensors
    (LoRA adapters and compiled wrappers left out), so it costs only the fp8 weights, never a
    transient second bf16 copy. Attach adapters and compile after quantizing.
    """
    if mode is FastMode.UNQUANTIZED:
        return transformer
    from torchao.quantization import quantize_

    twin = _bare_twin(transformer)
    quantize_(twin, torchao_config(mode), filter_fn=is_token_linear)
    return twin


def _bare_twin(transformer: nn.Module) -> nn.Module:
    _refuse_fused_adapters(transformer)
    with torch.device("meta"):
        twin = type(transformer).from_config(transformer.config)
    twin.load_state_dict(_base_weights(transformer), strict=True, assign=True)
    twin.train(transformer.training)
    twin.requires_grad_(False)
    return twin


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


@dataclass(frozen=True)
class CompileSetting:
    enabled: bool
    mode: str = DEFAULT_COMPILE_MODE
    backend: str = DEFAULT_COMPILE_BACKEND
    reason: str = ""


def compile_setting(value: str | None, backend: str | None, device: DeviceInfo) -> CompileSetting:
    """`LASSIE_COMPILE`: unset compiles on CUDA GPUs only (inductor's CPU code takes minutes to
    build for seconds of gain); 1 or a torch.compile mode name compiles on any device, so the
    compiled path runs in tests and on any machine; 0 never. `LASSIE_COMPILE_BACKEND` (default
    inductor) picks the backend, e.g. `aot_eager`, which specialises exactly as inductor does."""
    value = (value or "").strip().lower()
    backend = (backend or DEFAULT_COMPILE_BACKEND).strip()
    if value in OFF_VALUES:
        return CompileSetting(False, reason=f"{COMPILE_ENV}={value}")
    if value not in ON_VALUES and value not in COMPILE_MODES:
        allowed = ", ".join(["0", "1", *COMPILE_MODES])
        raise ValueError(f"{COMPILE_ENV} must be one of {allowed}, got {value!r}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"{COMPILE_BACKEND_ENV} must be one of {', '.join(sorted(backends))}, got {backend!r}")
    if not value and device.kind != "cuda":
        return CompileSetting(False, reason=f"no CUDA GPU ({device.describe()}); {COMPILE_ENV}=1 compiles anyway")
    mode = value if value in COMPILE_MODES else DEFAULT_COMPILE_MODE
    return CompileSetting(True, mode=mode, backend=backend, reason=f"backend {backend}, mode {mode}")


def configure_compile_cache(weights_dir: Path) -> Path | None:
    """Put inductor's caches (FX graphs, AOTAutograd, autotuning, Triton) next to the weights,
    so a restarted server reuses its compiled kernels. `TORCHINDUCTOR_CACHE_DIR` set by the
    operator wins, then `LASSIE_COMPILE_CACHE`. An unwritable place only costs the reuse."""
    directory = Path(os.environ.get(INDUCTOR_CACHE_ENV) or os.environ.get(COMPILE_CACHE_ENV)
                     or weights_dir / COMPILE_CACHE_DIRNAME)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("compile cache %s is not writable (%s); compiled kernels will not outlive this process",
                    directory, error)
        return None
    os.environ[INDUCTOR_CACHE_ENV] = str(directory)
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return directory


def compile_transformer(transformer: nn.Module, setting: CompileSetting) -> None:
    """Regional compile of the repeated blocks, in place (module names and PEFT keys unchanged).

    One graph per block class serves all 57 blocks, dev and schnell alike, which keeps compile
    time to a fraction of a whole-model compile. `dynamic=True` serves every output size and
    batch of 2 or more from one graph (batch 1 is specialised: its own graph). LoRA scales are
    tensors (`lassie.adapters`), so changing them never recompiles; the active-adapter set is
    guarded, one graph each. Modes are inductor's: other backends get none.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    inductor_mode = setting.backend == DEFAULT_COMPILE_BACKEND and setting.mode != DEFAULT_COMPILE_MODE
    mode = setting.mode if inductor_mode else None
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, mode=mode, backend=setting.backend)


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


def image_psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images of the same shape; infinite when they are identical."""
    if reference.shape != candidate.shape:
        raise ValueError(f"images differ in shape: {reference.shape} vs {candidate.shape}")
    error = np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))
