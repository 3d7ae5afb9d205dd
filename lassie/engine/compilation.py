"""Compiling the transformers: whether this server compiles (the operator's wish is in `lassie.settings`), inductor's
kernel cache, the regional compile. Warm-up belongs to `lassie.engine.variants`, which owns the transformers it runs."""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lassie.engine.hardware import DeviceInfo
from lassie.engine.internals import enable_compile_caches, raise_recompile_limit
from lassie.fetch.storage import writable_place
from lassie.settings import (
    COMPILE_BACKEND_ENV,
    COMPILE_ENV,
    DEFAULT_COMPILE_BACKEND,
    INDUCTOR_CACHE_ENV,
    CompileSettings,
    SettingError,
)

log = logging.getLogger(__name__)

DEFAULT_COMPILE_MODE = "default"
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileSetting:
    enabled: bool
    mode: str = DEFAULT_COMPILE_MODE
    backend: str = DEFAULT_COMPILE_BACKEND
    reason: str = ""


def compile_setting(settings: CompileSettings, device: DeviceInfo) -> CompileSetting:
    """Unset compiles on CUDA only (inductor's CPU code takes minutes to build for seconds of gain); asked for, on any
    device, so tests run the compiled path. A backend this torch lacks fails setup (`aot_eager` specialises as inductor)."""
    if settings.requested is False:
        return CompileSetting(False, reason=f"{COMPILE_ENV} is off")
    backends = torch.compiler.list_backends(exclude_tags=())
    if settings.backend not in backends:
        raise SettingError(COMPILE_BACKEND_ENV, f"one of {', '.join(sorted(backends))}", settings.backend)
    if settings.requested is None and device.kind != "cuda":
        return CompileSetting(False, reason=f"off by default without a CUDA GPU ({device.describe()})")
    return CompileSetting(True, settings.mode, settings.backend, f"backend {settings.backend}, mode {settings.mode}")


@dataclass(frozen=True)
class CompileCache:
    """Inductor's cache `directory`, and the portable `artifacts` written after warm-up and read before the next one;
    `carried` is one an image or weights volume may have brought (beside read-only weights), read when `artifacts` is not."""

    directory: Path
    artifacts: Path
    carried: Path | None = None

    def load(self) -> None:
        """Fill inductor's caches from the saved artifacts, so warm-up compiles only what they lack."""
        source = next((path for path in (self.artifacts, self.carried) if path and path.is_file()), None)
        if source is None:
            log.info("compile cache: no saved artifacts for this machine (%s); warm-up compiles from cold",
                     self.artifacts.name)
            return
        try:  # torch logs why and returns None for a corrupt or foreign file
            info = torch.compiler.load_cache_artifacts(source.read_bytes())
            problem = "" if info is not None else "torch logged why"
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            log.warning("compile cache: %s could not be read (%s); warm-up compiles from cold", source, problem)
        else:
            log.info("compile cache: loaded %s (%s)", source, _entries(info))

    def save(self) -> None:
        """Write what this process compiled or loaded, for the next start; a failure costs only that reuse."""
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                log.info("compile cache: nothing to save")
                return
            data, info = saved
            partial = self.artifacts.with_name(f"{self.artifacts.name}.{os.getpid()}.partial")  # servers may share it
            partial.write_bytes(data)
            partial.replace(self.artifacts)
            log.info("compile cache: saved %s (%d bytes; %s)", self.artifacts, len(data), _entries(info))
        except Exception as error:
            log.warning("compile cache: saving %s failed (%s: %s); the next start compiles from cold",
                        self.artifacts, type(error).__name__, error)


def _entries(info: object) -> str:
    """`CacheInfo`'s artifact counts by kind, on one line."""
    artifacts = getattr(info, "artifacts", None) or {}
    return ", ".join(f"{len(keys)} {kind}" for kind, keys in artifacts.items() if keys) or "no entries"


def artifacts_name(device: DeviceInfo, setting: CompileSetting) -> str:
    """What must match for compiled kernels to be reused: torch, Python, the device, its architecture and CUDA, the
    backend and mode. Anything else that changes a graph changes inductor's own keys inside the file: a miss."""
    parts = [f"torch-{torch.__version__}", f"py{sys.version_info.major}.{sys.version_info.minor}"]
    if device.is_gpu:
        major, minor = device.capability or (0, 0)
        parts += [device.name, f"sm{major}{minor}", f"cuda-{torch.version.cuda or torch.version.hip}"]
    else:
        parts += ["cpu", platform.machine()]
    parts += [setting.backend, setting.mode]
    return "artifacts_" + re.sub(r"[^A-Za-z0-9.+-]+", "-", "_".join(parts)) + ".bin"


def configure_compile_cache(settings: CompileSettings, weights_dir: Path, device: DeviceInfo,
                            setting: CompileSetting) -> CompileCache | None:
    """Inductor's caches where the operator chose, else beside the weights, so a restarted server reuses its kernels
    (read-only weights: a temporary place, their carried artifacts still read). Inductor reads `TORCHINDUCTOR_CACHE_DIR`
    at each use and memoises paths at the first compile: setting it before any compile is enough (torch 2.13)."""
    beside_weights = weights_dir / "compile-cache"
    name = artifacts_name(device, setting)
    try:
        directory = writable_place("compile cache", beside_weights, settings.cache_dir, settings.cache_variable)
    except OSError as error:
        log.warning("%s; compiled kernels will not outlive this process", error)
        return None
    os.environ[INDUCTOR_CACHE_ENV] = str(directory)
    enable_compile_caches()
    return CompileCache(directory, directory / name, beside_weights / name if directory != beside_weights else None)


def check_chosen_compile_cache(settings: CompileSettings) -> None:
    """A compile cache the operator named that cannot be written fails setup naming its variable, compiling or not:
    a typo must show on the day it is made, not on the day compiling is turned on."""
    if settings.cache_dir is not None:
        writable_place("compile cache", settings.cache_dir, settings.cache_dir, settings.cache_variable)


def compile_transformer(transformer: nn.Module, setting: CompileSetting) -> None:
    """Regional compile of the repeated blocks, in place (module names and PEFT keys unchanged): one graph per block
    class serves all 57 blocks of dev and schnell. `dynamic=True` serves every output size; LoRA scales are tensors
    (`lassie.engine.adapters`), so changing them never recompiles. Modes are inductor's only."""
    raise_recompile_limit(RECOMPILE_LIMIT)
    inductor_mode = setting.backend == DEFAULT_COMPILE_BACKEND and setting.mode != DEFAULT_COMPILE_MODE
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, mode=setting.mode if inductor_mode else None,
                                        backend=setting.backend)
