"""A LoRA file as the adapters take it: converted to diffusers keys, checked against FLUX before anything touches the
model (one that does not fit is refused, naming its field) and, in slot mode, in the form the hot-swap slot takes.
Converted once and kept on the CPU: `lassie.engine.adapters` loads it lazily into each transformer that runs it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from lassie.engine.internals import config_value, transformer_lora_config
from lassie.request.errors import EXTRA_LORA_FIELD, InputError
from lassie.settings import SLOT_RANK_ENV

log = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = "text_encoder."
LORA_A = ".lora_A."
LORA_B = ".lora_B."


@dataclass
class Lora:
    """A LoRA in diffusers keys; `slot_state_dict` is the transformer part of one that goes through the slot."""

    state_dict: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor] | None
    metadata: dict | None
    field_name: str  # what its errors start with
    slot_state_dict: dict[str, torch.Tensor] | None = None

    @property
    def has_text_encoder(self) -> bool:
        return any(key.startswith(TEXT_ENCODER_PREFIX) for key in self.state_dict)

    @property
    def swaps(self) -> bool:
        """Whether it runs in the transformers' slot rather than as an adapter of its own."""
        return self.slot_state_dict is not None


def read_lora(path: Path, pinned: bool, transformer: torch.nn.Module, text_encoder: torch.nn.Module,
              slot_rank: int) -> Lora:
    """Convert and check a LoRA file. Pinned is the Lassie LoRA (its errors name its file; its own adapter in slot mode
    too); any other came in `extra_lora`, and with a slot is made ready to swap here: one above the slot's rank is
    refused before anything touches the model."""
    field_name = f"Lassie LoRA ({path})" if pinned else EXTRA_LORA_FIELD
    state_dict, alphas, metadata = _convert(path, field_name)
    _check_fits(state_dict, transformer, text_encoder, field_name)
    lora = Lora(state_dict, alphas, metadata, field_name)
    if slot_rank and not pinned:
        lora.slot_state_dict = _slot_state_dict(lora, slot_rank)
        # Only the slot copy of the transformer part is ever used again: kept LoRAs hold it once.
        lora.state_dict = {key: value for key, value in state_dict.items() if key.startswith(TEXT_ENCODER_PREFIX)}
    return lora


def _convert(path: Path, field_name: str) -> tuple[dict, dict | None, dict | None]:
    """Any format diffusers' Flux loader knows (PEFT, kohya, XLabs, ComfyUI, fal) -> diffusers keys. Keys for neither
    the transformer nor CLIP (kohya's img_in, time_in, final_layer) are skipped and logged, as diffusers' loader does."""
    try:
        state_dict, alphas, metadata = FluxPipeline.lora_state_dict(str(path), return_alphas=True,
                                                                    return_lora_metadata=True)
    except Exception as error:  # diffusers raises many types for foreign files
        raise InputError(field_name, f"is not a FLUX LoRA diffusers can load: {error}") from None
    skipped = [key for key in state_dict if not key.startswith((TRANSFORMER_PREFIX, TEXT_ENCODER_PREFIX))]
    if skipped and len(skipped) < len(state_dict):
        log.warning("skipping %d LoRA keys FLUX's loader does not apply (e.g. %s)", len(skipped), skipped[0])
        state_dict = {key: value for key, value in state_dict.items() if key not in skipped}
    return dict(state_dict), alphas, metadata


def _check_fits(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, text_encoder: torch.nn.Module,
                field_name: str) -> None:
    """Refuse LoRAs of other architectures: diffusers would otherwise *expand* the transformer's layers for LoRAs with
    larger inputs (Flux Control LoRAs), a change that outlives the request."""
    roots = {TRANSFORMER_PREFIX: dict(transformer.named_modules()),
             TEXT_ENCODER_PREFIX: dict(text_encoder.named_modules())}
    lora_keys = [key for key in state_dict if LORA_A in key or LORA_B in key]
    if not lora_keys or len(lora_keys) != len(state_dict):
        foreign = sorted(set(state_dict) - set(lora_keys))[:3]
        raise InputError(field_name, f"is not a FLUX LoRA (unexpected keys such as {foreign or 'none at all'})")
    for key in lora_keys:
        prefix = next((p for p in roots if key.startswith(p)), None)
        if prefix is None:
            raise InputError(field_name, f"targets a component FLUX LoRAs cannot change: {key}")
        module_name = key[len(prefix):].split(".lora_")[0]
        module = roots[prefix].get(module_name)
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if not isinstance(module, torch.nn.Linear):
            raise InputError(field_name, f"does not fit FLUX: no linear layer {prefix}{module_name}")
        tensor = state_dict[key]
        expected = module.in_features if LORA_A in key else module.out_features
        actual = tensor.shape[1] if LORA_A in key else tensor.shape[0]
        if tensor.ndim != 2 or actual != expected:
            raise InputError(field_name, f"does not fit FLUX: {key} has shape {tuple(tensor.shape)}")
    # Each module's lora_A and lora_B must chain (one rank), or no loader can apply them.
    for module, (down, up) in _pairs(state_dict).items():
        if down is None or up is None or down.shape[0] != up.shape[1]:
            raise InputError(field_name, f"does not fit FLUX: the lora_A and lora_B of {module} do not chain")


def _pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """module -> (lora_A, lora_B), in the state dict's order."""
    downs = {key.split(LORA_A)[0]: tensor for key, tensor in state_dict.items() if LORA_A in key}
    ups = {key.split(LORA_B)[0]: tensor for key, tensor in state_dict.items() if LORA_B in key}
    return {module: (downs.get(module), ups.get(module)) for module in {**downs, **ups}}


def _strip_prefix(mapping: dict, prefix: str) -> dict:
    return {key.removeprefix(prefix): value for key, value in mapping.items() if key.startswith(prefix)}


def _pad_rank(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero rows (lora_A, dim 0) or columns (lora_B, dim 1) up to `rank`: the same LoRA, one rank."""
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, 0, missing) if dim == 0 else (0, missing))


def _slot_state_dict(lora: Lora, slot_rank: int) -> dict[str, torch.Tensor]:
    """`lora`'s transformer part, ready to hot-swap into the rank-`slot_rank` slot.

    alpha/r (alpha/sqrt(r) with rsLoRA) is baked into lora_B, because after a swap PEFT scales by the *slot's* alpha/r
    (1): so the LoRA runs at exactly `extra_lora_scale`. It comes from the LoraConfig diffusers' loader builds from the
    same inputs (ranks, network alphas or metadata, rsLoRA), looked up as PEFT does: what a named adapter would get.
    Every pair is zero-padded to the LoRA's largest rank (with one rank and no alphas diffusers writes no rank or alpha
    pattern, which the hot-swap would refuse); PEFT pads up to the slot's rank in place.
    """
    state_dict = _strip_prefix(lora.state_dict, TRANSFORMER_PREFIX)
    ranks = {f"^{key}": tensor.shape[1] for key, tensor in state_dict.items() if LORA_B in key}
    alphas = _strip_prefix(lora.alphas, TRANSFORMER_PREFIX) if lora.alphas else None
    metadata = _strip_prefix(lora.metadata, TRANSFORMER_PREFIX) if lora.metadata is not None else None
    try:
        config = transformer_lora_config(state_dict, alphas, metadata, ranks)
    except (TypeError, ValueError) as error:
        raise InputError(lora.field_name, f"has an adapter config diffusers cannot use: {error}") from None
    pairs = _pairs(state_dict)
    rank = max((down.shape[0] for down, _ in pairs.values()), default=0)
    if rank > slot_rank:
        raise InputError(lora.field_name, f"rank {rank} is above the hot-swap slot's rank of {slot_rank}; "
                         f"LoRAs up to rank {slot_rank} can be used here (the server's {SLOT_RANK_ENV} "
                         "sets the slot's rank)")
    swappable = {}
    for module, (down, up) in pairs.items():
        module_rank = config_value(config.rank_pattern, module, config.r)
        alpha = config_value(config.alpha_pattern, module, config.lora_alpha)
        scaling = float(alpha) / (math.sqrt(module_rank) if config.use_rslora else module_rank)
        # In float32, so a bf16 file loses nothing more than a named adapter would.
        scaled = up if scaling == 1.0 else up.float() * scaling
        swappable[f"{TRANSFORMER_PREFIX}{module}{LORA_A}weight"] = _pad_rank(down, rank, dim=0)
        swappable[f"{TRANSFORMER_PREFIX}{module}{LORA_B}weight"] = _pad_rank(scaled, rank, dim=1)
    return swappable
