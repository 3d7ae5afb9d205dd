"""LoRA adapters on the shared text encoder and the transformers, and which are active at what scale.

Every LoRA stays a separate PEFT adapter, never fused: a scale is set with PEFT's `set_scale`,
which recomputes `scale * alpha / r` from scratch, so changing scales is exact, never drifts
the base weights, and a scale is applied exactly once (never again through
`joint_attention_kwargs`). Adapters load lazily into the transformer a request actually uses,
and a load that fails removes every trace of itself, so the model is left as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils.peft_utils import delete_adapter_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from lassie.errors import InputError

log = logging.getLogger(__name__)

TEXT_ENCODER = "text_encoder"
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIX = "text_encoder."


@dataclass
class _Lora:
    """A LoRA converted to diffusers keys once, kept on the CPU for lazy loading into transformers."""

    state_dict: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor] | None
    metadata: dict | None
    loaded_into: set[str] = field(default_factory=set)

    @property
    def has_text_encoder(self) -> bool:
        return any(key.startswith(TEXT_ENCODER_PREFIX) for key in self.state_dict)


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
    roots = {TRANSFORMER_PREFIX: dict(transformer.named_modules()), TEXT_ENCODER_PREFIX: dict(text_encoder.named_modules())}
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


def _unwrap_layers_without_adapters(model: torch.nn.Module) -> None:
    """Put back the plain layer where PEFT's wrapper holds no adapter any more.

    Deleting an adapter leaves its wrapper behind; restoring the base layer keeps the model's
    structure (and state-dict keys) exactly as before the adapter came.
    """
    empty = [name for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer) and not any(getattr(module, attr) for attr in module.adapter_layer_names)]
    for name in empty:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, getattr(parent, child_name).get_base_layer())


class LoraAdapters:
    """The one owner of LoRA state on the loaded models."""

    def __init__(self, transformers: dict[str, torch.nn.Module], text_encoder: torch.nn.Module) -> None:
        self._transformers = transformers
        self._text_encoder = text_encoder
        self._loras: dict[str, _Lora] = {}
        self._active: dict[str, dict[str, float]] = {}

    def names(self) -> list[str]:
        return list(self._loras)

    def has_transformer(self, key: str) -> bool:
        return key in self._transformers

    def attach(self, key: str, transformer: torch.nn.Module) -> None:
        """Track another transformer (e.g. a go_fast fp8 copy); LoRAs load into it on first use."""
        self._transformers[key] = transformer

    def detach(self, key: str) -> None:
        """Forget a transformer that was dropped; its adapters went with it."""
        self._transformers.pop(key, None)
        self._active.pop(key, None)
        for lora in self._loras.values():
            lora.loaded_into.discard(key)

    def add(self, name: str, path: Path, field_name: str = "extra_lora") -> None:
        """Convert and check a LoRA file; it loads into a transformer the first time that one runs it."""
        state_dict, alphas, metadata = _drop_unloadable_keys(*_convert(path, field_name))
        _check_fits(state_dict, next(iter(self._transformers.values())), self._text_encoder, field_name)
        self._loras[name] = _Lora(state_dict, alphas, metadata)

    def remove(self, name: str) -> None:
        """Delete the adapter from every module that has it (also a half-loaded one)."""
        self._loras.pop(name, None)
        self._active.clear()
        for module in [*self._transformers.values(), self._text_encoder]:
            delete_adapter_layers(module, name)
            getattr(module, "peft_config", {}).pop(name, None)
            _unwrap_layers_without_adapters(module)

    def activate(self, model: str, scales: dict[str, float]) -> None:
        """Make exactly `scales`' adapters active on `model`'s transformer and the text encoder.

        Setting adapters walks every module of the transformer; when the wanted state is already
        active (the common case of repeated requests) that walk is skipped.
        """
        if self._active.get(model) == scales and self._active.get(TEXT_ENCODER) == scales:
            return
        self._active.clear()
        transformer = self._transformers[model]
        for name in scales:
            self._ensure_loaded(name, model)
        names, weights = list(scales), list(scales.values())
        if getattr(transformer, "peft_config", None):
            if names:
                transformer.enable_lora()
                transformer.set_adapters(names, weights)
            else:
                transformer.disable_lora()
        encoder_names = [n for n in names if self._loras[n].has_text_encoder]
        self._activate_text_encoder(encoder_names, [scales[n] for n in encoder_names])
        self._active[model] = self._active[TEXT_ENCODER] = dict(scales)

    def _activate_text_encoder(self, names: list[str], weights: list[float]) -> None:
        tuner_layers = [m for m in self._text_encoder.modules() if isinstance(m, BaseTunerLayer)]
        if not tuner_layers:
            return
        set_adapters_for_text_encoder(names, self._text_encoder, weights)
        for layer in tuner_layers:
            layer.enable_adapters(bool(names))

    def _ensure_loaded(self, name: str, model: str) -> None:
        lora = self._loras[name]
        if model in lora.loaded_into:
            return
        started = time.perf_counter()
        try:
            FluxPipeline.load_lora_into_transformer(
                dict(lora.state_dict), network_alphas=lora.alphas, transformer=self._transformers[model],
                adapter_name=name, metadata=lora.metadata, low_cpu_mem_usage=True,
            )
            if lora.has_text_encoder and TEXT_ENCODER not in lora.loaded_into:
                FluxPipeline.load_lora_into_text_encoder(
                    dict(lora.state_dict), network_alphas=lora.alphas, text_encoder=self._text_encoder,
                    prefix=TEXT_ENCODER, adapter_name=name, metadata=lora.metadata, low_cpu_mem_usage=True,
                )
                lora.loaded_into.add(TEXT_ENCODER)
        except Exception as error:
            self.remove(name)
            raise InputError("extra_lora", f"could not be applied to FLUX {model}: {error}") from None
        lora.loaded_into.add(model)
        log.info("LoRA %s loaded into %s in %.2fs", name, model, time.perf_counter() - started)
