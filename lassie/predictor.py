"""`Lassie`: the one owner of loaded models and active adapters; request -> plan -> images -> files."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from lassie import images as image_io
from lassie.adapters import SLOT_RANK, SLOT_RANK_ENV, SLOT_RANK_TIGHT_MEMORY, LoraAdapters, slot_rank_setting
from lassie.encoding import save_images
from lassie.generate import Inputs, generate
from lassie.lora_cache import LoraCache, lora_cache_dir
from lassie.models import Device, FluxModels, load_models, prepare_for_speed
from lassie.provision import ensure_weights
from lassie.quantization import (
    COMPILE_ENV,
    GO_FAST_MODE_ENV,
    CompileSetting,
    GoFastPlan,
    PrecisionLog,
    QuantizedTransformers,
    compile_setting,
    compile_transformer,
    configure_compile_cache,
    plan_go_fast,
    precision_of,
    query_device,
    requested_mode,
    table_sizes,
    warm_up,
)
from lassie.request import Mode, Plan, Request, make_plan
from lassie.safety import SafetyFilter
from lassie.sizes import size_from_image
from lassie.weights import WeightsLayout, default_weights_dir

log = logging.getLogger(__name__)

LASSIE_ADAPTER = "lassie"


@contextmanager
def timed(phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    log.info("%s took %.2fs", phase, time.perf_counter() - started)


def fast_key(model: str) -> str:
    return f"{model}-go-fast"


def extra_adapter_name(path: Path) -> str:
    """PEFT adapter names cannot hold dots or slashes: name extras by a digest of their cache file.

    The file's size and modification time are part of it, so a re-fetched file is a new adapter.
    """
    stat = path.stat()
    identity = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return "extra_" + hashlib.sha256(identity.encode()).hexdigest()[:12]


class Lassie:
    def __init__(self, weights_dir: Path | None = None) -> None:
        self.layout = WeightsLayout(Path(weights_dir) if weights_dir else default_weights_dir())
        self.models: FluxModels | None = None
        self.adapters: LoraAdapters | None = None
        self.lora_cache: LoraCache | None = None
        self.safety: SafetyFilter | None = None
        self._extra: str | None = None
        self._output_dir: Path | None = None
        self._device: Device | None = None
        self._fast: QuantizedTransformers | None = None
        self._compile: CompileSetting | None = None
        self._precision_log = PrecisionLog()

    def setup(self) -> None:
        ensure_weights(self.layout)
        hardware = query_device()
        self._device = Device.for_hardware(hardware.is_gpu)
        go_fast = plan_go_fast(hardware, requested_mode(os.environ.get(GO_FAST_MODE_ENV)))
        self._compile = compile_setting(os.environ.get(COMPILE_ENV), hardware)
        log.info("go_fast plan: %s; compile: %s", go_fast.reason, self._compile.reason)
        if self._compile.enabled:
            configure_compile_cache(self.layout.root)
        with timed("loading models"):
            self.models = load_models(self.layout, self._device)
            prepare_for_speed(self.models, hardware)
        with timed("loading the safety checker"):
            self.safety = SafetyFilter.load(self.layout, self._device.torch_device, self._device.dtype)
        with timed("loading the Lassie LoRA"):
            self.adapters = LoraAdapters(dict(self.models.transformers), self.models.text_encoder,
                                         slot_rank=self._slot_rank(go_fast))
            self.adapters.add(LASSIE_ADAPTER, self.layout.lassie_lora, field_name="lassie LoRA", pinned=True)
        self._fast = QuantizedTransformers(go_fast, on_evict=lambda model: self.adapters.detach(fast_key(model)))
        with timed("preparing transformers (adapters, fp8, compile)"):
            self._prepare_transformers(go_fast)
        self.lora_cache = LoraCache(lora_cache_dir(self.layout))
        log.info("ready; trigger word: %r", self.layout.trigger_word())

    def _slot_rank(self, go_fast: GoFastPlan) -> int | None:
        """Extra LoRAs hot-swap into a fixed slot when the transformers are compiled (see
        lassie.adapters). R = 128 takes nearly every published FLUX LoRA; where fp8 copies are
        built one at a time (GPUs under 90 GiB, e.g. an 80 GB H100) three transformers carry a
        slot at once, and R = 64 (0.65 GiB each at full size) keeps the memory rule's budget."""
        default = SLOT_RANK if go_fast.keep_quantized_resident else SLOT_RANK_TIGHT_MEMORY
        rank = slot_rank_setting(os.environ.get(SLOT_RANK_ENV), self._compile.enabled, default)
        log.info("extra LoRAs: %s", f"hot-swapped into a rank-{rank} slot" if rank else "one adapter each")
        return rank

    def _prepare_transformers(self, go_fast: GoFastPlan) -> None:
        """Adapters on every resident transformer, then compile, then warm every size once, with and
        without the extra-LoRA slot active (the two adapter sets requests run)."""
        variants = [(model, False) for model in self.models.transformers]
        if go_fast.quantizes and go_fast.keep_quantized_resident:
            variants += [(model, True) for model in self.models.transformers]
        for model in self.models.transformers:
            compile_transformer(self.models.transformers[model], self._compile)
        for model, fast in variants:
            key, _ = self._transformer_for(model, fast)
            self.adapters.activate(key, {LASSIE_ADAPTER: 1.0})
        if self._compile.enabled:
            warm_up(self._warm_up_phases(variants, outputs=1), table_sizes())
            warm_up(self._warm_up_phases(variants, outputs=2), table_sizes()[:1])

    def _warm_up_phases(self, variants: list[tuple[str, bool]], outputs: int) -> dict[str, partial]:
        """Batch 1 compiles a graph of its own; every larger batch and size shares one dynamic graph,
        so batches of 2 are warmed at a single size."""
        slot_states = (False, True) if self.adapters.slot_rank else (False,)
        return {f"{model} go_fast={fast}" + (" + extra-LoRA slot" if slot else "") + f", {outputs} output(s)":
                partial(self._warm_run, model, fast, slot, outputs)
                for model, fast in variants for slot in slot_states}

    def _warm_run(self, model: str, fast: bool, slot: bool, outputs: int, width: int, height: int) -> None:
        key, transformer = self._transformer_for(model, fast)
        if slot:
            self.adapters.activate_with_idle_slot(key, {LASSIE_ADAPTER: 1.0})
        else:
            self.adapters.activate(key, {LASSIE_ADAPTER: 1.0})
        plan = make_plan(Request(prompt="warm-up", model=model, num_inference_steps=1, seed=0, num_outputs=outputs))
        generate(self.models.pipeline(model, Mode.TXT2IMG, transformer), replace(plan, size=(width, height)), Inputs(),
                 self.models.prompts)

    def _transformer_for(self, model: str, go_fast: bool) -> tuple[str, torch.nn.Module]:
        """The bf16 transformer, or under go_fast the quantized copy this hardware runs (built on demand)."""
        bf16 = self.models.transformers[model]
        if not (go_fast and self._fast.plan.quantizes):
            return model, bf16
        key = fast_key(model)
        if not self.adapters.has_transformer(key):
            transformer = self._fast.get(model, bf16)
            self.adapters.attach(key, transformer)
            compile_transformer(transformer, self._compile)
        return key, self._fast.get(model, bf16)

    def predict(self, request: Request) -> list[Path]:
        plan = make_plan(request)
        log.info("seed %d; model %s; mode %s; go_fast %s", plan.seed, plan.model, plan.mode.value, plan.go_fast)
        with timed("reading inputs"):
            plan, inputs = self._read_inputs(plan, request)
        log.info("size %dx%d, %d steps, %d output(s)", *plan.size, plan.num_inference_steps, plan.num_outputs)
        with timed("applying LoRAs"):
            key, transformer = self._transformer_for(plan.model, plan.go_fast)
            self._activate_loras(plan, key)
        self._log_precision(plan)
        with timed("generating"):
            pipeline = self.models.pipeline(plan.model, plan.mode, transformer)
            results = generate(pipeline, plan, inputs, self.models.prompts)
        if plan.safety_checker:
            with timed("safety checking"):
                results = self.safety.filter(results).kept
        with timed("encoding"):
            return save_images(results, plan.output_format, plan.output_quality, self._fresh_output_dir())

    def _read_inputs(self, plan: Plan, request: Request) -> tuple[Plan, Inputs]:
        if plan.mode is Mode.TXT2IMG:
            return plan, Inputs()
        image = image_io.load_rgb(Path(request.image), field="image")
        size = size_from_image(*image.size)
        mask = image_io.load_mask(Path(request.mask), size) if plan.mode is Mode.INPAINT else None
        return replace(plan, size=size), Inputs(image=image_io.resized(image, size), mask=mask)

    def _log_precision(self, plan: Plan) -> None:
        self._precision_log.ran(plan.model, plan.go_fast, self._fast.plan, self._device.dtype)
        log.info("precision: %s", precision_of(self._fast.plan, plan.go_fast, self._device.dtype))

    def _activate_loras(self, plan: Plan, transformer_key: str) -> None:
        """Lassie always, the extra LoRA when asked; a failed new extra leaves the previous state."""
        scales = {LASSIE_ADAPTER: plan.lora_scale}
        new_extra = None
        if plan.extra_lora:
            with timed("fetching the extra LoRA"):
                path = self.lora_cache.fetch(plan.extra_lora)
            name = extra_adapter_name(path)
            if name not in self.adapters.names():
                self.adapters.add(name, path)
                new_extra = name
            scales[name] = plan.extra_lora_scale
        try:
            self.adapters.activate(transformer_key, scales)
        except Exception:
            if new_extra:
                self.adapters.remove(new_extra)
            raise
        if new_extra:
            if self._extra:
                self.adapters.remove(self._extra)
            self._extra = new_extra
        log.info("LoRA scales: %s", ", ".join(f"{name}={scale:g}" for name, scale in scales.items()))

    def _fresh_output_dir(self) -> Path:
        """Outputs of the previous prediction have been served by now: reuse no names across calls."""
        if self._output_dir is not None:
            shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir = Path(tempfile.mkdtemp(prefix="lassie-out-"))
        return self._output_dir
