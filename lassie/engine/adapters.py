"""LoRA adapters on the shared text encoder and the transformers, and which are active at what scale.

Every LoRA stays a separate, unmerged PEFT adapter. A scale is set with PEFT's `set_scale`, which
recomputes `scale * alpha / r` from scratch: changing scales is exact, never drifts the base
weights, and a scale is applied exactly once (never again through `joint_attention_kwargs`). The
active set is the same for every request (pinned LoRAs at any scale, 0 included; one slot, at 0
without an extra LoRA): one graph set.

Scales are graph inputs: on the transformers every PEFT `scaling` entry is a 0-dim tensor,
rewritten in place (PEFT's own hot-swap preparation does the same). As Python floats AOTAutograd
would bake them into the graph and guard on their values, so every new `lora_scale` would compile
again. The text encoder is never compiled and keeps PEFT's floats. Adapters load lazily into the
transformer a request uses, and a load that fails removes every trace of itself.

Slot mode (`slot_rank`, for compiled transformers): a new adapter *name* makes torch.compile trace
the blocks again, so extra LoRAs get no names on the transformers. Each transformer carries one
zero LoRA of rank `slot_rank` over every linear, the slot (`SLOT_ADAPTER`), and an extra LoRA up to
that rank is copied into it in place (diffusers' hot-swap): graphs compiled once serve every extra
LoRA. Only the transformer is compiled, so an extra LoRA's text-encoder part loads under its own
name as outside slot mode. See docs/go_fast.md for the rules this follows.
"""

from __future__ import annotations

import logging
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

from lassie.engine.internals import delete_text_encoder_adapter, set_text_encoder_adapters
from lassie.engine.lora_format import Lora, read_lora
from lassie.request.errors import InputError

log = logging.getLogger(__name__)

TEXT_ENCODER = "text_encoder"
SLOT_ADAPTER = "slot"


@dataclass
class _Transformer:
    """One transformer's LoRA state that its modules do not hold (which adapters it has, their
    layers and scales, PEFT's own config and layers say)."""

    module: torch.nn.Module
    slot_holds: str | None = None  # the LoRA in the slot; None: zeros
    active: dict[str, float] | None = None  # adapter -> scale as last set; None: set them again


def _has_adapter(module: torch.nn.Module, name: str) -> bool:
    return name in (getattr(module, "peft_config", None) or {})


def slot_rank_for(configured: int | None, compiled: bool, default: int) -> int:
    """The hot-swap slot's rank, 0 for none, from `LASSIE_LORA_SLOT_RANK`: unset, the `default`
    slot exactly when compiling, the only case where a new adapter name costs a recompile; else as
    set (CPU tests drive the slot this way without compiling)."""
    if configured is None:
        return default if compiled else 0
    return configured


def _linear_names(transformer: torch.nn.Module) -> list[str]:
    """Every linear of the transformer by its own name (a PEFT wrapper's, not its base layer's)."""
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            names.append(name)
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            names.append(name)
    return names


@torch.no_grad()
def _zero_slot(transformer: torch.nn.Module) -> None:
    for layer in transformer.modules():
        if isinstance(layer, BaseTunerLayer) and SLOT_ADAPTER in layer.lora_A:
            layer.lora_A[SLOT_ADAPTER].weight.zero_()
            layer.lora_B[SLOT_ADAPTER].weight.zero_()


def _create_slot(transformer: torch.nn.Module, rank: int) -> None:
    """A zero LoRA of `rank` on every linear, under the slot's fixed name.

    Every linear, because a LoRA swaps only into layers the slot already wraps, and FLUX LoRAs
    train any of them (kohya's the AdaLN modulation too; some the embedders or the final
    projection). The linears outside the blocks hold 1% of the slot. alpha = r: scaling 1.
    """
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=_linear_names(transformer))
    transformer.add_adapter(config, adapter_name=SLOT_ADAPTER)
    _zero_slot(transformer)
    _scales_as_tensors(transformer)


def _scales_as_tensors(transformer: torch.nn.Module) -> None:
    """Every new PEFT `scaling` float becomes a 0-dim tensor (see the module docstring): PEFT's own
    preparation for compiled hot-swapping converts the scales and nothing else without a target
    rank. Also after compiling (a named extra LoRA without slots): the blocks recompile anyway."""
    prepare_model_for_compiled_hotswap(transformer, check_compiled="ignore")


@torch.no_grad()
def _write_scales(transformer: torch.nn.Module, scales: dict[str, float]) -> None:
    """Set each adapter's scale with PEFT's own formula (alpha/r, rsLoRA), written into the
    tensor the graphs read instead of replacing it with a float."""
    for layer in (module for module in transformer.modules() if isinstance(module, LoraLayer)):
        for name, scale in scales.items():
            held = layer.scaling.get(name)
            if isinstance(held, torch.Tensor):
                layer.set_scale(name, scale)
                held.fill_(layer.scaling[name])
                layer.scaling[name] = held


def _write_slot(transformer: torch.nn.Module, lora: Lora | None) -> None:
    """Copy the LoRA into the slot's tensors in place (layers it does not train get zeros; None:
    all zeros). PEFT's hot-swap rewrites the slot's scaling tensors in place too."""
    if lora is None or not lora.slot_state_dict:
        _zero_slot(transformer)
        return
    FluxPipeline.load_lora_into_transformer(
        dict(lora.slot_state_dict), network_alphas=None, transformer=transformer,
        adapter_name=SLOT_ADAPTER, hotswap=True,
    )


def _unwrap_layers_without_adapters(model: torch.nn.Module) -> None:
    """Put back the plain layer where PEFT's wrapper holds no adapter any more: deleting an adapter
    leaves its wrapper behind, and the model's structure (and state-dict keys) must be as before."""
    empty = [name for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer)
             and not any(getattr(module, attr) for attr in module.adapter_layer_names)]
    for name in empty:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, getattr(parent, child_name).get_base_layer())


class LoraAdapters:
    """The one owner of LoRA state on the loaded models. Transformers are known by a key of the
    caller's choosing (`lassie.engine.variants.Variant`). With a `slot_rank`, the extra LoRAs go
    through each transformer's hot-swap slot; pinned ones (the Lassie LoRA) keep their own adapter."""

    def __init__(self, transformers: dict[Hashable, torch.nn.Module], text_encoder: torch.nn.Module,
                 slot_rank: int = 0) -> None:
        self._transformers = {key: _Transformer(module) for key, module in transformers.items()}
        self._text_encoder = text_encoder
        self._slot_rank = slot_rank
        self._loras: dict[str, Lora] = {}
        self._text_encoder_active: dict[str, float] | None = None

    @property
    def slot_rank(self) -> int:
        """The slot's rank; 0: no slot, every extra LoRA is its own adapter."""
        return self._slot_rank

    def names(self) -> list[str]:
        return list(self._loras)

    def slot_holds(self, key: Hashable) -> str | None:
        """The LoRA whose weights fill `key`'s slot (None: zeros, or no slot yet)."""
        return self._transformers[key].slot_holds

    def attach(self, key: Hashable, transformer: torch.nn.Module) -> None:
        """Track another transformer (e.g. the go_fast variant of a model); LoRAs load into it on first use."""
        self._transformers[key] = _Transformer(transformer)

    def add(self, name: str, path: Path, pinned: bool = False) -> None:
        """Convert and check a LoRA file (`read_lora`); it loads into a transformer the first time that one runs it."""
        first = next(iter(self._transformers.values())).module
        self._loras[name] = read_lora(path, pinned, first, self._text_encoder, self._slot_rank)

    def remove(self, name: str) -> None:
        """Delete the adapter from every module that has it (also a half-loaded one), and empty
        every slot holding it, so a slot holds exactly the LoRA `slot_holds` names, or zeros."""
        self._loras.pop(name, None)
        self._text_encoder_active = None
        for state in self._transformers.values():
            state.active = None
            state.module.delete_adapters(name)
            _unwrap_layers_without_adapters(state.module)
            if state.slot_holds == name:
                _zero_slot(state.module)
                state.slot_holds = None
        delete_text_encoder_adapter(self._text_encoder, name)
        _unwrap_layers_without_adapters(self._text_encoder)

    def activate(self, key: Hashable, scales: dict[str, float]) -> None:
        """Make exactly `scales`' adapters active on `key`'s transformer and the text encoder.

        The active set is changed only when it differs (setting adapters walks every module);
        scales are written in place. In slot mode at most one extra LoRA can be active: there is
        one slot.
        """
        self._ensure_loaded(list(scales), key)
        self._apply(key, self._transformer_scales(scales), scales)

    def _transformer_scales(self, scales: dict[str, float]) -> dict[str, float]:
        """Adapter name on the transformer -> scale: an extra LoRA runs under its slot's name. The
        set is the same for every request (one graph set): a pinned LoRA runs at 0 too, and
        without an extra LoRA the slot runs at 0."""
        swapped = [name for name in scales if self._loras[name].swaps]
        if len(swapped) > 1:
            raise ValueError(f"slot mode runs one extra LoRA at a time, not {len(swapped)}: {swapped}")
        transformer_scales = {SLOT_ADAPTER if name in swapped else name: scale for name, scale in scales.items()}
        if self._slot_rank and not swapped:
            transformer_scales[SLOT_ADAPTER] = 0.0
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
            self._activate_text_encoder(encoder_scales)
            self._text_encoder_active = encoder_scales

    def _activate_text_encoder(self, scales: dict[str, float]) -> None:
        tuner_layers = [m for m in self._text_encoder.modules() if isinstance(m, BaseTunerLayer)]
        if not tuner_layers:
            return
        set_text_encoder_adapters(self._text_encoder, list(scales), list(scales.values()))
        for layer in tuner_layers:
            layer.enable_adapters(bool(scales))

    def _ensure_loaded(self, names: list[str], key: Hashable) -> None:
        """Pinned adapters first, then the slot, then the extra into it: the slot comes last in
        every layer, as it does again when a failed swap makes us re-create it."""
        swapped = [name for name in names if self._loras[name].swaps]
        for name in names:
            if name not in swapped:
                self._ensure_named(name, key)
        if self._slot_rank:
            self._ensure_slot(key)
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

    def _ensure_slot(self, key: Hashable) -> None:
        """Give the transformer its slot before its first run (adding it later would change the
        module structure under the compiled blocks: a recompile), or again when a failed swap lost it."""
        state = self._transformers[key]
        if not _has_adapter(state.module, SLOT_ADAPTER):
            _create_slot(state.module, self._slot_rank)
            state.active = None

    def _ensure_in_slot(self, name: str, key: Hashable) -> None:
        """Swap the LoRA into the transformer's slot; on failure the slot holds what it held before."""
        lora, state = self._loras[name], self._transformers[key]
        if state.slot_holds == name:
            return
        started = time.perf_counter()
        try:
            self._ensure_in_text_encoder(name)
            _write_slot(state.module, lora)
        except Exception as error:
            self._restore_slot(key)
            self.remove(name)
            raise InputError(lora.field_name, f"could not be swapped into the FLUX transformer: {error}") from None
        state.slot_holds = name
        state.active = None
        log.info("LoRA %s swapped into the %s rank-%d slot in %.2fs", name, key, self._slot_rank,
                 time.perf_counter() - started)

    def _restore_slot(self, key: Hashable) -> None:
        """Put back what the slot held before a failed swap. diffusers deletes the slot adapter when
        a hot-swap fails: it is re-created with the same modules and rank, so the layers' adapters
        are in the order the compiled graphs were traced with, and refilled."""
        state = self._transformers[key]
        self._ensure_slot(key)
        _write_slot(state.module, self._loras[state.slot_holds] if state.slot_holds else None)
        state.active = None
        log.warning("restored the %s slot (%s) after a failed swap", key, state.slot_holds or "zeros")
