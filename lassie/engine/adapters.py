"""LoRA adapters on the shared text encoder and the transformers, and which are active at what scale.

Every LoRA stays a separate PEFT adapter, never fused by PEFT: a scale is set with PEFT's
`set_scale`, which recomputes `scale * alpha / r` from scratch, so changing scales is exact, never
drifts the base weights, and a scale is applied exactly once (never again through
`joint_attention_kwargs`).

By default every adapter stays unmerged and, with `idle_active`, the active set is the same for
every request (pinned LoRAs at any scale, 0 included; one slot, at 0 without an extra LoRA): one
graph set. Merged (`merge`, once at setup, for the Lassie LoRA with `LASSIE_MERGE_LASSIE`): a
pinned LoRA's `scale * B @ A * alpha/r` is added into a transformer's base weights, computed in
float32, so the common request runs no LoRA work per step. Its adapter stays loaded as a
*delta*: a request at scale s runs it at s - merged, and (without `idle_active`) not at all when
that is 0. Not PEFT's `merge()`: its `merged` flag makes a layer skip every adapter, the hot-swap
slot included, and unmerging per request would drift the weights.

Scales are graph inputs: on the transformers every PEFT `scaling` entry is a 0-dim tensor,
rewritten in place (PEFT's own hot-swap preparation does the same). As Python floats they
would be constants to torch.compile: AOTAutograd bakes them into the graph and guards on their
values, so every new `lora_scale` would compile again. The text encoder is never compiled and
keeps PEFT's floats. Adapters load lazily into the transformer a request actually uses,
and a load that fails removes every trace of itself, so the model is left as it was.

Slot mode (`slot_ranks`, for compiled transformers): a new adapter *name* makes torch.compile
trace the blocks again, so extra LoRAs do not get names on the transformers. Each transformer
carries a few zero LoRAs over every linear, the slots, one per rank in `slot_ranks` (named by
`slot_adapter`), and an extra LoRA is copied in place (diffusers' hot-swap) into the narrowest
slot its rank fits: a slot's matmuls cost what its rank costs, whatever the LoRA in it needs, so
a rank-16 LoRA runs at the cost of rank 32, not of the widest slot. The adapter names never
change, and the active set is only ever a subset of {pinned, one slot}: graphs compiled once
serve every extra LoRA. Only the transformer is compiled, so an extra LoRA's text-encoder part
loads under its own name as outside slot mode. See docs/go_fast.md for the rules this follows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

from lassie.engine.internals import (
    config_value,
    delete_text_encoder_adapter,
    set_text_encoder_adapters,
    transformer_lora_config,
)
from lassie.request.errors import EXTRA_LORA_FIELD, InputError
from lassie.settings import SLOT_RANK_ENV

log = logging.getLogger(__name__)

TEXT_ENCODER = "text_encoder"
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = "text_encoder."
LORA_A = ".lora_A."
LORA_B = ".lora_B."


@dataclass
class _Lora:
    """A LoRA converted to diffusers keys once, kept on the CPU for lazy loading into transformers.

    `pinned` LoRAs keep their own adapter in slot mode too; `slot_state_dict` is the transformer
    part of any other LoRA, made ready to hot-swap into the rank-`slot_rank` slot (slot mode
    only). `field_name` is what its errors start with (see `error_label`).
    """

    state_dict: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor] | None
    metadata: dict | None
    field_name: str
    pinned: bool = False
    slot_state_dict: dict[str, torch.Tensor] | None = None
    slot_rank: int = 0

    @property
    def has_text_encoder(self) -> bool:
        return any(key.startswith(TEXT_ENCODER_PREFIX) for key in self.state_dict)


@dataclass
class _Transformer:
    """One transformer's LoRA state that its modules do not hold (which adapters it has, their
    layers and scales, PEFT's own config and layers say)."""

    module: torch.nn.Module
    merged: dict[str, float] = field(default_factory=dict)  # pinned LoRA -> the scale in its base weights
    slot_holds: dict[int, str | None] | None = None  # slot rank -> the LoRA in it (None: zeros); None: no slots yet
    active: dict[str, float] | None = None  # adapter -> scale as last set; None: set them again


def _has_adapter(module: torch.nn.Module, name: str) -> bool:
    return name in (getattr(module, "peft_config", None) or {})


def _convert(path: Path, field_name: str) -> tuple[dict, dict | None, dict | None]:
    """Any format diffusers' Flux loader knows (PEFT, kohya, XLabs, ComfyUI, fal) -> diffusers keys."""
    try:
        state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True
        )
    except Exception as error:  # diffusers raises many types for foreign files
        raise InputError(field_name, f"is not a FLUX LoRA diffusers can load: {error}") from None
    return dict(state_dict), alphas, metadata


def _drop_unloadable_keys(state_dict: dict, alphas: dict | None, metadata: dict | None) -> tuple:
    """Keys for neither the transformer nor the CLIP encoder (kohya's img_in, time_in, final_layer
    converted without a prefix) are skipped, as diffusers' own loader skips them, and logged."""
    skipped = [key for key in state_dict if not key.startswith((TRANSFORMER_PREFIX, TEXT_ENCODER_PREFIX))]
    if skipped and len(skipped) < len(state_dict):
        log.warning("skipping %d LoRA keys FLUX's loader does not apply (e.g. %s)", len(skipped), skipped[0])
        state_dict = {key: value for key, value in state_dict.items() if key not in skipped}
    return state_dict, alphas, metadata


def _check_fits(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, text_encoder: torch.nn.Module,
                field_name: str) -> None:
    """Refuse LoRAs of other architectures before anything touches the model.

    diffusers would otherwise *expand* the transformer's layers for LoRAs with larger inputs
    (Flux Control LoRAs), a change that outlives the request.
    """
    roots = {TRANSFORMER_PREFIX: dict(transformer.named_modules()),
             TEXT_ENCODER_PREFIX: dict(text_encoder.named_modules())}
    lora_keys = [key for key in state_dict if ".lora_A." in key or ".lora_B." in key]
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
        expected = module.in_features if ".lora_A." in key else module.out_features
        actual = tensor.shape[1] if ".lora_A." in key else tensor.shape[0]
        if tensor.ndim != 2 or actual != expected:
            raise InputError(field_name, f"does not fit FLUX: {key} has shape {tuple(tensor.shape)}")
    _check_pairs(state_dict, field_name)


def _check_pairs(state_dict: dict[str, torch.Tensor], field_name: str) -> None:
    """Each module's lora_A and lora_B must chain (one rank), or no loader can apply them."""
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


def error_label(path: Path, pinned: bool) -> str:
    """What a LoRA's errors start with: a pinned LoRA is the Lassie LoRA, loaded at setup from
    the weights, so its errors name that file; any other came with a request, in `extra_lora`."""
    return f"Lassie LoRA ({path})" if pinned else EXTRA_LORA_FIELD


def slot_ranks_for(configured: tuple[int, ...] | None, compiled: bool,
                   default: tuple[int, ...]) -> tuple[int, ...]:
    """The hot-swap slots' ranks, () for none, from the operator's `LASSIE_LORA_SLOT_RANK`.

    Unset (None): the `default` slots exactly when the transformers are compiled, the only case
    where a new adapter name costs anything (a recompile). 0 (()): never. Ranks: always, those
    (CPU tests drive the slots this way without compiling).
    """
    if configured is None:
        return default if compiled else ()
    return configured


def slot_adapter(rank: int) -> str:
    """The adapter name of the rank-`rank` slot (extra LoRAs outside slot mode are named by their cache key)."""
    return f"slot{rank}"


def _transformer_lora_config(lora: _Lora) -> LoraConfig:
    """The LoraConfig diffusers' loader builds for this LoRA's transformer part.

    Same inputs, same diffusers function: the ranks, network alphas or saved metadata (rsLoRA
    included) give each module the alpha/r a named adapter would get.
    """
    state_dict = _strip_prefix(lora.state_dict, TRANSFORMER_PREFIX)
    ranks = {f"^{key}": tensor.shape[1] for key, tensor in state_dict.items() if LORA_B in key}
    alphas = _strip_prefix(lora.alphas, TRANSFORMER_PREFIX) if lora.alphas else None
    metadata = _strip_prefix(lora.metadata, TRANSFORMER_PREFIX) if lora.metadata is not None else None
    return transformer_lora_config(state_dict, alphas, metadata, ranks)


def _module_scaling(config: LoraConfig, module: str) -> float:
    """alpha/r (alpha/sqrt(r) with rsLoRA) of `module`, looked up in the config as PEFT does."""
    rank = config_value(config.rank_pattern, module, config.r)
    alpha = config_value(config.alpha_pattern, module, config.lora_alpha)
    return float(alpha) / (math.sqrt(rank) if config.use_rslora else rank)


def _scaled(up: torch.Tensor, scaling: float) -> torch.Tensor:
    """lora_B times alpha/r, in float32 so a bf16 file loses nothing more than a named adapter would."""
    return up if scaling == 1.0 else up.float() * scaling


def _pad_rank(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero rows (lora_A, dim 0) or columns (lora_B, dim 1) up to `rank`: the same LoRA, one rank."""
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, 0, missing) if dim == 0 else (0, missing))


def _slot_state_dict(lora: _Lora, slot_ranks: tuple[int, ...], field_name: str) -> tuple[int, dict[str, torch.Tensor]]:
    """The narrowest slot rank that fits `lora`, and its transformer part, ready to hot-swap there.

    alpha/r is baked into lora_B because after a swap PEFT scales by the *slot's* alpha/r (1):
    baked, the LoRA runs at exactly `extra_lora_scale`. Every pair is zero-padded to the LoRA's
    largest rank: with one rank and no alphas diffusers writes no rank or alpha pattern, which
    the hot-swap would refuse as incompatible with the slot. PEFT zero-pads up to R in place.
    """
    try:
        config = _transformer_lora_config(lora)
    except (TypeError, ValueError) as error:
        raise InputError(field_name, f"has an adapter config diffusers cannot use: {error}") from None
    pairs = _pairs(_strip_prefix(lora.state_dict, TRANSFORMER_PREFIX))
    rank = max((down.shape[0] for down, _ in pairs.values()), default=0)
    slot_rank = next((slot for slot in slot_ranks if slot >= rank), None)
    if slot_rank is None:
        raise InputError(field_name, f"rank {rank} is above the widest hot-swap slot's rank of {slot_ranks[-1]}; "
                         f"LoRAs up to rank {slot_ranks[-1]} can be used here (the server's {SLOT_RANK_ENV} "
                         "sets the slots' ranks)")
    swappable = {}
    for module, (down, up) in pairs.items():
        swappable[f"{TRANSFORMER_PREFIX}{module}{LORA_A}weight"] = _pad_rank(down, rank, dim=0)
        swappable[f"{TRANSFORMER_PREFIX}{module}{LORA_B}weight"] = _pad_rank(
            _scaled(up, _module_scaling(config, module)), rank, dim=1)
    return slot_rank, swappable


def _linear_names(transformer: torch.nn.Module) -> list[str]:
    """Every linear of the transformer by its own name (a PEFT wrapper's, not its base layer's)."""
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            names.append(name)
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            names.append(name)
    return names


def _slot_layers(transformer: torch.nn.Module, name: str) -> list[BaseTunerLayer]:
    return [module for module in transformer.modules() if isinstance(module, BaseTunerLayer) and name in module.lora_A]


@torch.no_grad()
def _zero_slot(transformer: torch.nn.Module, rank: int) -> None:
    name = slot_adapter(rank)
    for layer in _slot_layers(transformer, name):
        layer.lora_A[name].weight.zero_()
        layer.lora_B[name].weight.zero_()


def _create_slot(transformer: torch.nn.Module, rank: int) -> None:
    """A zero LoRA of `rank` on every linear, under the rank's fixed slot name.

    Every linear, because a LoRA swaps only into layers the slot already wraps, and FLUX LoRAs
    train any of them (kohya's the AdaLN modulation too; some the embedders or the final
    projection). The linears outside the blocks hold 1% of the slot. alpha = r: scaling 1.
    """
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=_linear_names(transformer))
    transformer.add_adapter(config, adapter_name=slot_adapter(rank))
    _zero_slot(transformer, rank)
    _scales_as_tensors(transformer)


def _lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _scales_as_tensors(transformer: torch.nn.Module) -> None:
    """Turn every new PEFT `scaling` float into a 0-dim tensor beside the layer's weight, so
    compiled graphs read scales as inputs (see the module docstring): PEFT's own preparation for
    compiled hot-swapping, which converts the scales and nothing else without a target rank. Also
    after compiling (an extra LoRA as a named adapter without slots): the blocks recompile anyway."""
    prepare_model_for_compiled_hotswap(transformer, check_compiled="ignore")


@torch.no_grad()
def _write_scales(transformer: torch.nn.Module, scales: dict[str, float]) -> None:
    """Set each adapter's scale with PEFT's own formula (alpha/r, rsLoRA), written into the
    tensor the graphs read instead of replacing it with a float."""
    for layer in _lora_layers(transformer):
        for name, scale in scales.items():
            held = layer.scaling.get(name)
            if isinstance(held, torch.Tensor):
                layer.set_scale(name, scale)
                held.fill_(layer.scaling[name])
                layer.scaling[name] = held


def _unwrap_layers_without_adapters(model: torch.nn.Module) -> None:
    """Put back the plain layer where PEFT's wrapper holds no adapter any more.

    Deleting an adapter leaves its wrapper behind; restoring the base layer keeps the model's
    structure (and state-dict keys) exactly as before the adapter came.
    """
    empty = [name for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer)
             and not any(getattr(module, attr) for attr in module.adapter_layer_names)]
    for name in empty:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, getattr(parent, child_name).get_base_layer())


def _unit_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """B @ A * alpha/r (alpha/sqrt(r) with rsLoRA) in float32: what the adapter adds at scale 1."""
    if layer.use_dora.get(name) or layer.lora_bias.get(name) or getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{name} is not a plain LoRA on {type(layer.get_base_layer()).__name__} (DoRA, bias or "
                         "fan-in-fan-out): it cannot be merged into the weights")
    rank = layer.r[name]
    scaling = layer.lora_alpha[name] / (math.sqrt(rank) if layer.use_rslora.get(name) else rank)
    return (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * scaling


def _with_delta(weight: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """weight + scale * delta, added in float32 and cast back to the weight's dtype."""
    return (weight.float() + scale * delta.to(weight.device)).to(weight.dtype)


@torch.no_grad()
def _merge_into_weights(transformer: torch.nn.Module, name: str, scale: float) -> None:
    """Add `scale` x the LoRA into the base weights of every layer it adapts.

    Every layer is checked before any weight changes; if adding fails part-way, the layers done
    are put back by subtracting what was added (within one rounding of the weights' dtype).
    """
    layers = [layer for layer in _lora_layers(transformer) if name in layer.lora_A]
    for layer in layers:
        weight = layer.get_base_layer().weight
        if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
            raise ValueError(f"{type(weight.data).__name__} {weight.dtype} weights cannot take a merged LoRA")
        _unit_delta(layer, name)
    done = []
    try:
        for layer in layers:
            weight = layer.get_base_layer().weight
            weight.copy_(_with_delta(weight, _unit_delta(layer, name), scale))
            done.append(layer)
    except Exception:
        for layer in done:
            weight = layer.get_base_layer().weight
            weight.copy_(_with_delta(weight, _unit_delta(layer, name), -scale))
        raise


class LoraAdapters:
    """The one owner of LoRA state on the loaded models.

    Transformers are known by a key of the caller's choosing (the variants owner uses
    `lassie.engine.variants.Variant`). With `slot_ranks`, LoRAs that are not pinned (the extras) go
    through one of each transformer's hot-swap slots; pinned ones (the Lassie LoRA) keep their own
    adapter, loaded as usual, and may be merged into a transformer's weights at one scale
    (`merge`), their adapter then running only the difference to a request's scale.
    """

    def __init__(self, transformers: dict[Hashable, torch.nn.Module], text_encoder: torch.nn.Module,
                 slot_ranks: tuple[int, ...] = (), idle_active: bool = True) -> None:
        self._transformers = {key: _Transformer(module) for key, module in transformers.items()}
        self._text_encoder = text_encoder
        self._slot_ranks = tuple(sorted(slot_ranks))
        self._idle_active = idle_active
        self._loras: dict[str, _Lora] = {}
        self._text_encoder_active: dict[str, float] | None = None

    @property
    def slot_ranks(self) -> tuple[int, ...]:
        return self._slot_ranks

    def names(self) -> list[str]:
        return list(self._loras)

    def slot_holds(self, key: Hashable) -> dict[int, str | None]:
        """Slot rank -> the LoRA whose weights fill that slot of `key` (None: zeros); {} before
        `key`'s first run gives it its slots."""
        return dict(self._transformers[key].slot_holds or {})

    def attach(self, key: Hashable, transformer: torch.nn.Module, merged: dict[str, float] | None = None) -> None:
        """Track another transformer (e.g. the go_fast variant of a model); LoRAs load into it on first use.

        `merged`: pinned LoRA -> the scale its weights were built with (see `merged_weight`).
        """
        self._transformers[key] = _Transformer(transformer, merged=dict(merged or {}))

    def merged_scale(self, key: Hashable, name: str) -> float:
        """The scale of `name` held in `key`'s base weights (0: not merged)."""
        return self._transformers[key].merged.get(name, 0.0)

    def merge(self, key: Hashable, name: str, scale: float) -> None:
        """Add the pinned LoRA `name` at `scale` into `key`'s base weights, once (at setup).

        The LoRA must be loaded into that transformer (activated once). From now on a request at
        scale s runs its adapter at s - `scale` only. On failure the weights are as before (see
        `_merge_into_weights`) and the LoRA stays an adapter at the request's scale.
        """
        lora = self._loras[name]
        state = self._transformers[key]
        if not lora.pinned or not _has_adapter(state.module, name) or self.merged_scale(key, name):
            raise ValueError(f"{name} is not a pinned LoRA loaded, unmerged, into {key}")
        _merge_into_weights(state.module, name, scale)
        state.merged[name] = scale
        state.active = None

    def merged_weight(self, key: Hashable, name: str, module: str, weight: torch.Tensor,
                      scale: float) -> torch.Tensor | None:
        """`weight` plus `scale` x the LoRA `name` as loaded into `key`'s layer `module` (a new tensor),
        or None where that LoRA does not adapt `module`: how a go_fast copy built from `key`'s
        weights gets its own merge scale."""
        try:
            layer = self._transformers[key].module.get_submodule(module)
        except AttributeError:
            return None
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            return None
        with torch.no_grad():
            return _with_delta(weight, _unit_delta(layer, name), scale)

    def add(self, name: str, path: Path, pinned: bool = False) -> None:
        """Convert and check a LoRA file; it loads into a transformer the first time that one runs it.

        In slot mode an extra LoRA is also made ready to swap here, into the narrowest slot it
        fits, so one that fits none (rank above the widest) is refused before anything touches
        the model.
        """
        field_name = error_label(path, pinned)
        state_dict, alphas, metadata = _drop_unloadable_keys(*_convert(path, field_name))
        _check_fits(state_dict, next(iter(self._transformers.values())).module, self._text_encoder, field_name)
        lora = _Lora(state_dict, alphas, metadata, field_name=field_name, pinned=pinned)
        if self._swaps(lora):
            lora.slot_rank, lora.slot_state_dict = _slot_state_dict(lora, self._slot_ranks, field_name)
            # Only the slot copy of the transformer part is ever used again: kept LoRAs hold it once.
            lora.state_dict = {key: value for key, value in state_dict.items() if key.startswith(TEXT_ENCODER_PREFIX)}
        self._loras[name] = lora

    def remove(self, name: str) -> None:
        """Delete the adapter from every module that has it (also a half-loaded one), and empty
        every slot holding it, so a slot holds exactly the LoRA `slot_holds` names, or zeros."""
        self._loras.pop(name, None)
        self._text_encoder_active = None
        for state in self._transformers.values():
            state.active = None
            state.module.delete_adapters(name)
            _unwrap_layers_without_adapters(state.module)
            for rank, held in (state.slot_holds or {}).items():
                if held == name:
                    _zero_slot(state.module, rank)
                    state.slot_holds[rank] = None
        delete_text_encoder_adapter(self._text_encoder, name)
        _unwrap_layers_without_adapters(self._text_encoder)

    def activate(self, key: Hashable, scales: dict[str, float]) -> None:
        """Make exactly `scales`' adapters active on `key`'s transformer and the text encoder.

        The active set is changed only when it differs (setting adapters walks every module);
        scales are written in place. In slot mode at most one extra LoRA can be active: graphs
        are warmed with one slot at a time.
        """
        self._ensure_loaded(list(scales), key)
        self._apply(key, self._transformer_scales(key, scales), scales)

    def activate_with_idle_slot(self, key: Hashable, scales: dict[str, float], slot_rank: int) -> None:
        """`scales` plus the rank-`slot_rank` slot at scale 0: the adapter set of requests with an
        extra LoRA in that slot, for warm-up to compile before any extra LoRA exists."""
        if slot_rank not in self._slot_ranks:
            raise ValueError(f"no rank-{slot_rank} slot: the slots' ranks are {self._slot_ranks}")
        self._ensure_loaded(list(scales), key)
        slots = {slot_adapter(rank) for rank in self._slot_ranks}
        transformer_scales = {name: scale for name, scale in self._transformer_scales(key, scales).items()
                              if name not in slots}
        self._apply(key, {**transformer_scales, slot_adapter(slot_rank): 0.0}, scales)

    def _swaps(self, lora: _Lora) -> bool:
        return bool(self._slot_ranks) and not lora.pinned

    def _transformer_scales(self, key: Hashable, scales: dict[str, float]) -> dict[str, float]:
        """Adapter name on the transformer -> scale: an extra LoRA runs under its slot's name; a
        pinned one at what its merged weights lack. With `idle_active` the set is the same for
        every request (one graph set): a pinned LoRA runs at 0 too, and without an extra LoRA the
        narrowest slot runs at 0; without, those idle adapters are off."""
        swapped = [name for name in scales if self._swaps(self._loras[name])]
        if len(swapped) > 1:
            raise ValueError(f"slot mode runs one extra LoRA at a time, not {len(swapped)}: {swapped}")
        transformer_scales = {}
        for name, scale in scales.items():
            if name in swapped:
                transformer_scales[slot_adapter(self._loras[name].slot_rank)] = scale
            elif not self._loras[name].pinned:
                transformer_scales[name] = scale
            elif self._idle_active or scale != self.merged_scale(key, name):
                transformer_scales[name] = scale - self.merged_scale(key, name)
        if self._idle_active and self._slot_ranks and not swapped:
            transformer_scales[slot_adapter(self._slot_ranks[0])] = 0.0
        return transformer_scales

    def _apply(self, key: Hashable, transformer_scales: dict[str, float], scales: dict[str, float]) -> None:
        state = self._transformers[key]
        transformer, active = state.module, state.active
        if getattr(transformer, "peft_config", None) and active != transformer_scales:
            if not transformer_scales:
                transformer.disable_lora()
            elif active is None or list(active) != list(transformer_scales):
                transformer.enable_lora()
                transformer.set_adapter(list(transformer_scales))
            _write_scales(transformer, transformer_scales)
        state.active = dict(transformer_scales)
        encoder_scales = {name: scale for name, scale in scales.items() if self._loras[name].has_text_encoder}
        if encoder_scales != self._text_encoder_active:
            self._activate_text_encoder(list(encoder_scales), list(encoder_scales.values()))
            self._text_encoder_active = encoder_scales

    def _activate_text_encoder(self, names: list[str], weights: list[float]) -> None:
        tuner_layers = [m for m in self._text_encoder.modules() if isinstance(m, BaseTunerLayer)]
        if not tuner_layers:
            return
        set_text_encoder_adapters(self._text_encoder, names, weights)
        for layer in tuner_layers:
            layer.enable_adapters(bool(names))

    def _ensure_loaded(self, names: list[str], key: Hashable) -> None:
        """Pinned adapters first, then the slots, then the extra into one: the slots come last in
        every layer, narrowest first, as they do again when a failed swap makes us re-create them."""
        swapped = [name for name in names if self._swaps(self._loras[name])]
        for name in names:
            if name not in swapped:
                self._ensure_named(name, key)
        if self._slot_ranks:
            self._ensure_slots(key)
        for name in swapped:
            self._ensure_in_slot(name, key)

    def _ensure_named(self, name: str, key: Hashable) -> None:
        """Load the LoRA as its own adapter into the transformer (and the text encoder)."""
        lora, state = self._loras[name], self._transformers[key]
        if _has_adapter(state.module, name):
            return
        started = time.perf_counter()
        try:
            FluxPipeline.load_lora_into_transformer(
                dict(lora.state_dict), network_alphas=lora.alphas, transformer=state.module,
                adapter_name=name, metadata=lora.metadata, low_cpu_mem_usage=True,
            )
            self._ensure_in_text_encoder(name)
        except Exception as error:
            self.remove(name)
            raise InputError(lora.field_name, f"could not be applied to the FLUX transformer: {error}") from None
        _scales_as_tensors(state.module)
        state.active = None
        log.info("LoRA %s loaded into %s in %.2fs", name, key, time.perf_counter() - started)

    def _ensure_in_text_encoder(self, name: str) -> None:
        lora = self._loras[name]
        if lora.has_text_encoder and not _has_adapter(self._text_encoder, name):
            FluxPipeline.load_lora_into_text_encoder(
                dict(lora.state_dict), network_alphas=lora.alphas, text_encoder=self._text_encoder,
                prefix=TEXT_ENCODER, adapter_name=name, metadata=lora.metadata, low_cpu_mem_usage=True,
            )
            self._text_encoder_active = None

    def _ensure_slots(self, key: Hashable) -> None:
        """Give the transformer its slots before its first run: adding them later would change the
        module structure under the compiled blocks (a recompile)."""
        state = self._transformers[key]
        if state.slot_holds is None:
            for rank in self._slot_ranks:
                _create_slot(state.module, rank)
            state.active = None
            state.slot_holds = dict.fromkeys(self._slot_ranks)

    def _ensure_in_slot(self, name: str, key: Hashable) -> None:
        """Swap the LoRA into its slot of the transformer; on failure every slot holds what it held before."""
        lora, state = self._loras[name], self._transformers[key]
        if state.slot_holds[lora.slot_rank] == name:
            return
        started = time.perf_counter()
        try:
            self._ensure_in_text_encoder(name)
            self._write_slot(key, lora.slot_rank, lora)
        except Exception as error:
            self._restore_slots(key)
            self.remove(name)
            raise InputError(lora.field_name, f"could not be swapped into the FLUX transformer: {error}") from None
        state.slot_holds[lora.slot_rank] = name
        state.active = None
        log.info("LoRA %s swapped into the %s rank-%d slot in %.2fs", name, key, lora.slot_rank,
                 time.perf_counter() - started)

    def _write_slot(self, key: Hashable, rank: int, lora: _Lora) -> None:
        """Copy the LoRA into the rank-`rank` slot's tensors in place (layers it does not train get
        zeros). PEFT's hot-swap rewrites the slot's scaling tensors in place too."""
        transformer = self._transformers[key].module
        if not lora.slot_state_dict:
            _zero_slot(transformer, rank)
            return
        FluxPipeline.load_lora_into_transformer(
            dict(lora.slot_state_dict), network_alphas=None, transformer=transformer,
            adapter_name=slot_adapter(rank), hotswap=True,
        )

    def _restore_slots(self, key: Hashable) -> None:
        """Put back what the slots held before a failed swap.

        diffusers deletes the slot adapter when a hot-swap fails: then every slot is re-created,
        narrowest first, with the same modules and ranks, so the layers' adapters are in the order
        the compiled graphs were traced with, and each is refilled with what it held.
        """
        state = self._transformers[key]
        transformer = state.module
        config = getattr(transformer, "peft_config", {})
        if any(slot_adapter(rank) not in config for rank in self._slot_ranks):
            transformer.delete_adapters([slot_adapter(rank) for rank in self._slot_ranks])
            for rank in self._slot_ranks:
                _create_slot(transformer, rank)
        for rank, held in state.slot_holds.items():
            if held is None:
                _zero_slot(transformer, rank)
            else:
                self._write_slot(key, rank, self._loras[held])
        state.active = None
        log.warning("restored the %s slots (%s) after a failed swap", key,
                    ", ".join(f"rank {rank}: {held or 'zeros'}" for rank, held in state.slot_holds.items()))
