"""Which attention kernel the FLUX transformers run, through diffusers' attention backends.

The choice is a pure function of the device and what is installed (`choose_attention`), so its
table is tested anywhere. On CUDA: FlashAttention 3 on Hopper where its package is installed,
else cuDNN's fused attention through torch SDPA (built into torch, the fastest native kernel on
compute capability 8.0 and up), else torch's native SDPA. Hub-downloaded kernels are never
chosen: servers fetch nothing they did not ship. `use_attention` checks the chosen backend on a
tiny input against float32 attention before any request runs, and falls back to native with the
reason logged when the backend is missing or wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

from lassie.engine.internals import CUDNN_ATTENTION, FLASH_3_ATTENTION
from lassie.quiet import dropping
from lassie.settings import ATTENTION_AUTO, ATTENTION_BACKEND_ENV, SettingError

log = logging.getLogger(__name__)

NATIVE = AttentionBackendName.NATIVE.value
CUDNN = CUDNN_ATTENTION
FLASH_3 = FLASH_3_ATTENTION
FLASH_3_PACKAGE = "flash_attn_3"
HOPPER = 9
EXPERIMENTAL_WARNING = "Attention backends are an experimental feature"
CHECK_TOKENS = 256


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    reason: str


def choose_attention(device_kind: str, capability: tuple[int, int] | None,
                     installed: frozenset[str]) -> AttentionChoice:
    """The fastest backend for this device kind ("cpu", "cuda", "rocm") and compute capability."""
    if device_kind != "cuda":
        return AttentionChoice(NATIVE, f"torch's native SDPA on {device_kind}")
    if FLASH_3_PACKAGE in installed and capability is not None and capability[0] == HOPPER:
        return AttentionChoice(FLASH_3, "FlashAttention 3 (installed) on a Hopper GPU")
    if capability is not None and capability >= (8, 0):
        return AttentionChoice(CUDNN, "cuDNN fused attention through torch SDPA (compute capability 8.0+)")
    return AttentionChoice(NATIVE, "torch's native SDPA (no faster kernel for this GPU)")


def asked_attention(setting: str, device_kind: str, capability: tuple[int, int] | None,
                    installed: frozenset[str]) -> AttentionChoice:
    """The operator's `LASSIE_ATTENTION_BACKEND`: `auto` is `choose_attention`'s pick; any other
    value must name a backend this diffusers has (a typo fails setup naming the variable)."""
    if setting == ATTENTION_AUTO:
        return choose_attention(device_kind, capability, installed)
    known = [backend.value for backend in AttentionBackendName]
    if setting not in known:
        raise SettingError(ATTENTION_BACKEND_ENV, f"{ATTENTION_AUTO} or one of {', '.join(known)}", setting)
    return AttentionChoice(setting, f"{ATTENTION_BACKEND_ENV}={setting}")


def installed_attention_packages() -> frozenset[str]:
    """The optional attention packages diffusers finds installed (none are dependencies of ours)."""
    from diffusers.utils import is_flash_attn_3_available

    return frozenset({FLASH_3_PACKAGE} if is_flash_attn_3_available() else set())


def use_attention(transformers: Iterable[torch.nn.Module], choice: AttentionChoice) -> str:
    """Run `choice` on every transformer if it passes the tiny check, else native; returns the backend.

    diffusers also makes the backend the process's active one, so transformers built later from
    the same config (the go_fast copies) dispatch to it too.
    """
    transformers = list(transformers)
    if choice.backend == NATIVE:
        log.info("attention: %s (%s)", NATIVE, choice.reason)
        return NATIVE
    try:
        _set_backend(transformers, choice.backend)
        _check(choice.backend, transformers[0])
    except Exception as error:  # a missing package, a kernel this GPU lacks, wrong numbers
        _set_backend(transformers, NATIVE)
        log.warning("attention: %s (%s is unavailable: %s)", NATIVE, choice.backend, _first_line(error))
        return NATIVE
    log.info("attention: %s (%s)", choice.backend, choice.reason)
    return choice.backend


def _set_backend(transformers: list[torch.nn.Module], backend: str) -> None:
    with dropping({"diffusers.models.modeling_utils": (EXPERIMENTAL_WARNING,)}):
        for transformer in transformers:
            transformer.set_attention_backend(backend)


@torch.inference_mode()
def _check(backend: str, transformer: torch.nn.Module) -> None:
    """The backend on a small input of the transformer's head shape, device and dtype, against
    float32 attention; raises when it fails or its numbers are off."""
    config = transformer.config
    generator = torch.Generator(transformer.device).manual_seed(0)
    shape = (1, CHECK_TOKENS, config.num_attention_heads, config.attention_head_dim)
    query, key, value = (torch.randn(shape, generator=generator, device=transformer.device).to(transformer.dtype)
                         for _ in range(3))
    output = dispatch_attention_fn(query, key, value, backend=AttentionBackendName(backend))
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(tensor.float().transpose(1, 2) for tensor in (query, key, value))).transpose(1, 2)
    tolerance = 1e-4 if transformer.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(output.float(), expected, atol=tolerance, rtol=tolerance)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
