"""Compiling the transformers: whether this server compiles, its kernel cache, and the regional compile.

What the operator asked for is `lassie.settings.CompileSettings`; what only this machine can
decide is here: whether torch has the asked backend, and compiling by default on CUDA GPUs only.
Warm-up (which graphs to compile before the first request) is `lassie.variants`'s, the owner of
the transformers it runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lassie.hardware import DeviceInfo
from lassie.settings import (
    COMPILE_BACKEND_ENV,
    COMPILE_ENV,
    DEFAULT_COMPILE_BACKEND,
    INDUCTOR_CACHE_ENV,
    CompileSettings,
    SettingError,
)

log = logging.getLogger(__name__)

COMPILE_CACHE_DIRNAME = "compile-cache"
DEFAULT_COMPILE_MODE = "default"
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileSetting:
    enabled: bool
    mode: str = DEFAULT_COMPILE_MODE
    backend: str = DEFAULT_COMPILE_BACKEND
    reason: str = ""


def compile_setting(settings: CompileSettings, device: DeviceInfo) -> CompileSetting:
    """`LASSIE_COMPILE`: unset compiles on CUDA GPUs only (inductor's CPU code takes minutes to
    build for seconds of gain); on or a torch.compile mode name compiles on any device, so the
    compiled path runs in tests and on any machine; off never. `LASSIE_COMPILE_BACKEND` (default
    inductor) picks the backend, e.g. `aot_eager`, which specialises exactly as inductor does;
    one this torch does not have fails setup."""
    if settings.requested is False:
        return CompileSetting(False, reason=f"{COMPILE_ENV} is off")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if settings.backend not in backends:
        raise SettingError(COMPILE_BACKEND_ENV, f"one of {', '.join(sorted(backends))}", settings.backend)
    if settings.requested is None and device.kind != "cuda":
        return CompileSetting(False, reason=f"no CUDA GPU ({device.describe()}); {COMPILE_ENV}=1 compiles anyway")
    return CompileSetting(True, mode=settings.mode, backend=settings.backend,
                          reason=f"backend {settings.backend}, mode {settings.mode}")


def configure_compile_cache(settings: CompileSettings, weights_dir: Path) -> Path | None:
    """Put inductor's caches (FX graphs, AOTAutograd, autotuning, Triton) next to the weights,
    so a restarted server reuses its compiled kernels, unless the operator chose a place
    (`TORCHINDUCTOR_CACHE_DIR`, then `LASSIE_COMPILE_CACHE`). Inductor reads the place from
    `TORCHINDUCTOR_CACHE_DIR`, so that is where it goes. An unwritable place only costs the reuse."""
    directory = settings.cache_dir or weights_dir / COMPILE_CACHE_DIRNAME
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
    tensors (`lassie.lora.adapters`), so changing them never recompiles; the active-adapter set is
    guarded, one graph each. Modes are inductor's: other backends get none.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    inductor_mode = setting.backend == DEFAULT_COMPILE_BACKEND and setting.mode != DEFAULT_COMPILE_MODE
    mode = setting.mode if inductor_mode else None
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, mode=mode, backend=setting.backend)
