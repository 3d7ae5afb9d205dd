"""Every library internal lassie still relies on, each with why no public call does it. Checked against
`CHECKED_AGAINST` (a test holds the installed versions to them, so an upgrade is an audit of this module only).
Everything else uses public calls (docs/go_fast.md, "Compile, and switching LoRAs without recompiling", names them)."""

from __future__ import annotations

import traceback

import torch
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils.peft_utils import _create_lora_config, delete_adapter_layers
from peft import LoraConfig
from peft.utils.other import get_pattern_key

CHECKED_AGAINST = {"diffusers": "0.42.1", "peft": "0.21.2", "torch": "2.13.0"}

# The batch dimension of the inputs of diffusers' FluxTransformerBlock and FluxSingleTransformerBlock forwards, as
# torch.compile names them (`torch.compiler.config.unbacked_sources`): traced unbacked, so one graph serves every batch.
FLUX_BLOCK_BATCH_DIMENSIONS = "L['hidden_states']:0,L['encoder_hidden_states']:0,L['temb']:0"


def transformer_lora_config(state_dict: dict[str, torch.Tensor], alphas: dict | None, metadata: dict | None,
                            ranks: dict[str, int]) -> LoraConfig:
    """The LoraConfig diffusers' own loader builds for a state dict (ranks, network alphas or saved metadata, rsLoRA),
    so a slot bakes in the alpha/r a named adapter would get. diffusers has no public call for it."""
    return _create_lora_config(state_dict, alphas, metadata, ranks)


def config_value(patterns: dict, module: str, default):
    """A module's rank or alpha in a LoraConfig's pattern, matched as PEFT matches it."""
    return patterns.get(get_pattern_key(patterns.keys(), module), default)


def set_text_encoder_adapters(text_encoder: torch.nn.Module, names: list[str], weights: list[float]) -> None:
    """What the pipeline's `set_adapters` does for its text encoder, without touching the transformer (whose scales
    are tensors)."""
    set_adapters_for_text_encoder(names, text_encoder, weights)


def delete_text_encoder_adapter(text_encoder: torch.nn.Module, name: str) -> None:
    """Remove `name`'s layers (also a half-loaded adapter's) and config from the text encoder; transformers' own
    `delete_adapter` refuses an adapter whose config never arrived."""
    delete_adapter_layers(text_encoder, name)
    getattr(text_encoder, "peft_config", {}).pop(name, None)


# Where torch's compiler runs: dynamo's frames, AOTAutograd's runtime wrappers and inductor's generated code.
COMPILER_MODULES = ("torch._dynamo.", "torch._functorch.", "torch._inductor.")


def enable_compile_caches() -> None:
    """Inductor's FX graph and autotune caches and AOTAutograd's cache, so the kernels in TORCHINDUCTOR_CACHE_DIR are
    reused; torch reads their variables only at import, and has no public switch after it."""
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True


def raise_recompile_limit(limit: int) -> None:
    """Dynamo's per-code-object cache size: every output size and precision of a block shares one code object."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def compiled_graph_count() -> int:
    """The graphs dynamo has compiled in this process (its own counter; torch.compiler offers none)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def raised_in_compiled_code(error: BaseException) -> bool:
    """Whether `error` came through torch's compiler, as every compiled block's does: a pipeline's input checks, the
    VAE's and the text encoders' errors would not change if run again eagerly."""
    return any(frame.f_globals.get("__name__", "").startswith(COMPILER_MODULES)
               for frame, _ in traceback.walk_tb(error.__traceback__))
