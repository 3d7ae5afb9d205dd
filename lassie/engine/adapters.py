"""LoRAs on the shared text encoder and the transformers as unmerged PEFT adapters (the base weights never drift),
checked against FLUX before anything touches the model, their scales 0-dim tensors (one graph set for any scale), and
when compiled extra LoRAs hot-swapped into one zero slot (docs/go_fast.md, "Compile, and switching LoRAs without
recompiling")."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

from lassie.engine import internals
from lassie.request.errors import EXTRA_LORA_FIELD, InputError
from lassie.settings import SLOT_RANK_ENV

log = logging.getLogger(__name__)

TEXT_ENCODER = "text_encoder"
SLOT_ADAPTER = "slot"
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = f"{TEXT_ENCODER}."
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


def _convert(path: Path, field_name: str) -> tuple[dict, dict | None, dict | None]:
    """Any format diffusers' Flux loader knows (PEFT, kohya, XLabs, ComfyUI, fal) -> diffusers keys. Keys for neither
    the transformer nor CLIP (kohya's img_in, time_in, final_layer) are skipped, as diffusers' loader skips them."""
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
        tensor, down = state_dict[key], LORA_A in key
        expected = module.in_features if down else module.out_features
        if tensor.ndim != 2 or tensor.shape[1 if down else 0] != expected:
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
    return torch.nn.functional.pad(tensor, (0, 0, 0, missing) if dim == 0 else (0, missing)) if missing else tensor


def _slot_state_dict(lora: Lora, slot_rank: int) -> dict[str, torch.Tensor]:
    """`lora`'s transformer part, ready to hot-swap into the rank-`slot_rank` slot. After a swap PEFT scales by the
    *slot's* alpha/r (1), so the LoRA's own alpha/r (alpha/sqrt(r) with rsLoRA), from the LoraConfig diffusers' loader
    builds, as a named adapter gets it, is baked into lora_B. Pairs are zero-padded to the LoRA's largest rank: with one
    rank and no alphas diffusers writes no rank or alpha pattern, which the hot-swap would refuse."""
    state_dict = _strip_prefix(lora.state_dict, TRANSFORMER_PREFIX)
    ranks = {f"^{key}": tensor.shape[1] for key, tensor in state_dict.items() if LORA_B in key}
    alphas = _strip_prefix(lora.alphas, TRANSFORMER_PREFIX) if lora.alphas else None
    metadata = _strip_prefix(lora.metadata, TRANSFORMER_PREFIX) if lora.metadata is not None else None
    try:
        config = internals.transformer_lora_config(state_dict, alphas, metadata, ranks)
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
        module_rank = internals.config_value(config.rank_pattern, module, config.r)
        alpha = internals.config_value(config.alpha_pattern, module, config.lora_alpha)
        scaling = float(alpha) / (math.sqrt(module_rank) if config.use_rslora else module_rank)
        # In float32, so a bf16 file loses nothing more than a named adapter would.
        scaled = up if scaling == 1.0 else up.float() * scaling
        swappable[f"{TRANSFORMER_PREFIX}{module}{LORA_A}weight"] = _pad_rank(down, rank, dim=0)
        swappable[f"{TRANSFORMER_PREFIX}{module}{LORA_B}weight"] = _pad_rank(scaled, rank, dim=1)
    return swappable


@dataclass
class _Transformer:
    """One transformer's LoRA state that PEFT's config and layers do not hold."""

    module: torch.nn.Module
    slot_holds: str | None = None  # the LoRA in the slot; None: zeros
    active: dict[str, float] | None = None  # adapter -> scale as last set; None: set them again


def _has_adapter(module: torch.nn.Module, name: str) -> bool:
    return name in (getattr(module, "peft_config", None) or {})


def slot_rank_for(configured: int | None, compiled: bool, default: int) -> int:
    """The slot's rank (0: none) from `LASSIE_LORA_SLOT_RANK`. Unset: `default` exactly when compiling, the only case
    where a new adapter name costs a recompile (CPU tests set it to drive the slot without compiling)."""
    return (default if compiled else 0) if configured is None else configured


@torch.no_grad()
def _zero_slot(transformer: torch.nn.Module) -> None:
    for layer in transformer.modules():
        if isinstance(layer, BaseTunerLayer) and SLOT_ADAPTER in layer.lora_A:
            layer.lora_A[SLOT_ADAPTER].weight.zero_()
            layer.lora_B[SLOT_ADAPTER].weight.zero_()


@torch.no_grad()
def _write_scales(transformer: torch.nn.Module, scales: dict[str, float]) -> None:
    """Each adapter's scale by PEFT's own formula (alpha/r, rsLoRA), written into the tensor the graphs read."""
    for layer in (module for module in transformer.modules() if isinstance(module, LoraLayer)):
        for name, scale in scales.items():
            held = layer.scaling.get(name)
            if isinstance(held, torch.Tensor):
                layer.set_scale(name, scale)
                held.fill_(layer.scaling[name])
                layer.scaling[name] = held


def _write_slot(transformer: torch.nn.Module, lora: Lora | None) -> None:
    """The LoRA copied into the slot in place (layers it does not train, or None: zeros), scalings too (hot-swap)."""
    if lora is None or not lora.slot_state_dict:
        _zero_slot(transformer)
        return
    FluxPipeline.load_lora_into_transformer(dict(lora.slot_state_dict), network_alphas=None, transformer=transformer,
                                            adapter_name=SLOT_ADAPTER, hotswap=True)


def _unwrap_layers_without_adapters(model: torch.nn.Module) -> None:
    """The plain layer back where PEFT's wrapper holds no adapter (deleting one leaves the wrapper): keys as before."""
    empty = [name for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer) and not any(getattr(module, a) for a in module.adapter_layer_names)]
    for name in empty:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, getattr(parent, child_name).get_base_layer())


class LoraAdapters:
    """The one owner of LoRA state on the loaded models, transformers known by the caller's key (`variants.Variant`)."""

    def __init__(self, transformers: dict[Hashable, torch.nn.Module], text_encoder: torch.nn.Module,
                 slot_rank: int = 0) -> None:
        self._transformers = {key: _Transformer(module) for key, module in transformers.items()}
        self._text_encoder = text_encoder
        self.slot_rank = slot_rank  # 0: no slot, every extra LoRA is its own adapter
        self._loras: dict[str, Lora] = {}
        self._text_encoder_active: dict[str, float] | None = None

    def names(self) -> list[str]:
        return list(self._loras)

    def slot_holds(self, key: Hashable) -> str | None:
        """The LoRA whose weights fill `key`'s slot (None: zeros, or no slot yet)."""
        return self._transformers[key].slot_holds

    def add(self, name: str, path: Path, pinned: bool = False) -> None:
        """Convert and check a LoRA file; it loads into a transformer the first time that one runs it. Pinned: the
        Lassie LoRA (errors name its file; its own adapter in slot mode too); else it came in `extra_lora` and, with a
        slot, is made ready to swap here: above the slot's rank it is refused before anything touches the model."""
        field_name = f"Lassie LoRA ({path})" if pinned else EXTRA_LORA_FIELD
        state_dict, alphas, metadata = _convert(path, field_name)
        _check_fits(state_dict, next(iter(self._transformers.values())).module, self._text_encoder, field_name)
        lora = Lora(state_dict, alphas, metadata, field_name)
        if self.slot_rank and not pinned:
            lora.slot_state_dict = _slot_state_dict(lora, self.slot_rank)
            # Only the slot copy of the transformer part is ever used again: kept LoRAs hold it once.
            lora.state_dict = {key: value for key, value in state_dict.items() if key.startswith(TEXT_ENCODER_PREFIX)}
        self._loras[name] = lora

    def remove(self, name: str) -> None:
        """Delete the adapter from every module that has it (a half-loaded one too) and empty every slot holding it."""
        self._loras.pop(name, None)
        self._text_encoder_active = None
        for state in self._transformers.values():
            state.active = None
            state.module.delete_adapters(name)
            _unwrap_layers_without_adapters(state.module)
            if state.slot_holds == name:
                _zero_slot(state.module)
                state.slot_holds = None
        internals.delete_text_encoder_adapter(self._text_encoder, name)
        _unwrap_layers_without_adapters(self._text_encoder)

    def activate(self, key: Hashable, scales: dict[str, float]) -> None:
        """Make exactly `scales`' adapters active on `key`'s transformer and the text encoder, an extra LoRA under the
        slot's name (one slot: one extra LoRA at a time). The active set is set only when it changed (that walks every
        module); scales are written in place."""
        swapped = [name for name in scales if self._loras[name].slot_state_dict is not None]
        if len(swapped) > 1:
            raise ValueError(f"slot mode runs one extra LoRA at a time, not {len(swapped)}: {swapped}")
        # Pinned adapters first, then the slot, then the extra into it: the slot comes last in every layer, as it does
        # again when a failed swap re-creates it.
        for name in scales:
            if name not in swapped:
                self._ensure_named(name, key)
        if self.slot_rank:
            self._ensure_slot(key)
        for name in swapped:
            self._ensure_in_slot(name, key)
        transformer_scales = {SLOT_ADAPTER if name in swapped else name: scale for name, scale in scales.items()}
        if self.slot_rank and not swapped:
            transformer_scales[SLOT_ADAPTER] = 0.0
        state = self._transformers[key]
        if getattr(state.module, "peft_config", None) and state.active != transformer_scales:
            if not transformer_scales:
                state.module.disable_lora()
            elif state.active is None or list(state.active) != list(transformer_scales):
                state.module.enable_lora()
                state.module.set_adapter(list(transformer_scales))
            _write_scales(state.module, transformer_scales)
        state.active = dict(transformer_scales)
        text_scales = {name: scale for name, scale in scales.items() if self._loras[name].has_text_encoder}
        if text_scales != self._text_encoder_active:
            tuner_layers = [m for m in self._text_encoder.modules() if isinstance(m, BaseTunerLayer)]
            if tuner_layers:
                internals.set_text_encoder_adapters(self._text_encoder, list(text_scales), list(text_scales.values()))
            for layer in tuner_layers:
                layer.enable_adapters(bool(text_scales))
            self._text_encoder_active = text_scales

    def _ensure_named(self, name: str, key: Hashable) -> None:
        lora, state = self._loras[name], self._transformers[key]
        if _has_adapter(state.module, name):
            return
        started = time.perf_counter()
        try:
            FluxPipeline.load_lora_into_transformer(dict(lora.state_dict), network_alphas=lora.alphas,
                                                    transformer=state.module, adapter_name=name,
                                                    metadata=lora.metadata, low_cpu_mem_usage=True)
            self._ensure_in_text_encoder(name)
        except Exception as error:
            self.remove(name)
            raise InputError(lora.field_name, f"could not be applied to the FLUX transformer: {error}") from None
        # Its `scaling` floats become 0-dim tensors: without a target rank that is all PEFT's compiled hot-swap
        # preparation does ("ignore": after compiling, a named extra LoRA recompiles the blocks anyway).
        prepare_model_for_compiled_hotswap(state.module, check_compiled="ignore")
        state.active = None
        log.info("LoRA %s loaded into %s in %.2fs", name, key, time.perf_counter() - started)

    def _ensure_in_text_encoder(self, name: str) -> None:
        lora = self._loras[name]
        if lora.has_text_encoder and not _has_adapter(self._text_encoder, name):
            FluxPipeline.load_lora_into_text_encoder(dict(lora.state_dict), network_alphas=lora.alphas,
                                                     text_encoder=self._text_encoder, prefix=TEXT_ENCODER,
                                                     adapter_name=name, metadata=lora.metadata, low_cpu_mem_usage=True)
            self._text_encoder_active = None

    def _ensure_slot(self, key: Hashable) -> None:
        """A zero LoRA of the slot's rank (alpha = r: scaling 1) on every linear, named as PEFT's wrapper: a LoRA swaps
        only into layers the slot wraps, and FLUX LoRAs train any (kohya's the AdaLN modulation too). Made before the
        first run (later it would change modules under compiled blocks: a recompile) or when a failed swap lost it."""
        module = self._transformers[key].module
        if _has_adapter(module, SLOT_ADAPTER):
            return
        linears = [name for name, m in module.named_modules()
                   if (isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), torch.nn.Linear))
                   or (isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"))]
        module.add_adapter(LoraConfig(r=self.slot_rank, lora_alpha=self.slot_rank, target_modules=linears),
                           adapter_name=SLOT_ADAPTER)
        _zero_slot(module)
        prepare_model_for_compiled_hotswap(module, check_compiled="ignore")  # scales as tensors, as above
        self._transformers[key].active = None

    def _ensure_in_slot(self, name: str, key: Hashable) -> None:
        """Swap the LoRA into the slot. On failure diffusers has deleted the slot adapter: it is re-created with the
        same modules and rank (the layers' adapters in the order the graphs were traced with) and refilled."""
        lora, state = self._loras[name], self._transformers[key]
        if state.slot_holds == name:
            return
        started = time.perf_counter()
        try:
            self._ensure_in_text_encoder(name)
            _write_slot(state.module, lora)
        except Exception as error:
            self._ensure_slot(key)
            _write_slot(state.module, self._loras[state.slot_holds] if state.slot_holds else None)
            log.warning("restored the %s slot (%s) after a failed swap", key, state.slot_holds or "zeros")
            self.remove(name)
            raise InputError(lora.field_name, f"could not be swapped into the FLUX transformer: {error}") from None
        state.slot_holds = name
        state.active = None
        log.info("LoRA %s swapped into the %s rank-%d slot in %.2fs", name, key, self.slot_rank,
                 time.perf_counter() - started)
