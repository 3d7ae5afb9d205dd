"""`Lassie`: the one owner of loaded models and active adapters; request -> plan -> images -> files."""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lassie.engine import adapters, compilation, go_fast, hardware, memory, models, safety, variants
from lassie.engine.generate import generate
from lassie.fetch.lora_cache import HeldLora, LoraCache
from lassie.fetch.lora_sources import identify
from lassie.fetch.storage import writable_place
from lassie.quiet import no_progress_bars
from lassie.request.errors import EXTRA_LORA_FIELD, InputError
from lassie.request.images import Inputs, load_inputs
from lassie.request.outputs import OutputFolders, save_images
from lassie.request.plan import Plan, Request, checked, describe, make_plan
from lassie.settings import DEFAULT_SLOT_RANK, LORA_CACHE_ENV, Settings
from lassie.weights.lassie_lora import resolve
from lassie.weights.layout import WeightsLayout
from lassie.weights.provision import ensure_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A request ready for the GPU: its extra LoRA parsed once, its file held in the cache until `release`."""

    plan: Plan
    inputs: Inputs
    extra_lora: HeldLora | None

    def release(self) -> None:
        if self.extra_lora is not None:
            self.extra_lora.release()


@contextmanager
def timed(phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    log.info("%s took %.2fs", phase, time.perf_counter() - started)


class Lassie:
    """Built from the operator's `Settings` (read once, by the caller); nothing here reads the environment."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = WeightsLayout(settings.weights_dir)
        self.models: models.FluxModels | None = None
        self.variants: variants.TransformerVariants | None = None
        self.lora_cache: LoraCache | None = None
        self.safety: safety.SafetyFilter | None = None
        self._outputs = OutputFolders()
        self._device: hardware.DeviceInfo | None = None
        self._go_fast: go_fast.GoFastPlan | None = None  # the go_fast decision, made once by setup
        self._precision_log = go_fast.PrecisionLog()

    def setup(self) -> None:
        no_progress_bars()
        compilation.check_chosen_compile_cache(self.settings.compile)
        OutputFolders.remove_leftovers()
        atexit.register(self._outputs.remove_current)
        lora_cache_dir = writable_place("extra-LoRA cache", self.layout.lora_cache_dir, self.settings.lora.cache_dir,
                                        LORA_CACHE_ENV)
        ensure_weights(self.layout, self.settings)
        lassie = resolve(self.layout, self.settings)  # the one file everything below uses
        self._device = device = hardware.query_device()
        wanted_go_fast = go_fast.plan_go_fast(device, go_fast.requested_mode(self.settings.go_fast_mode))
        compiling = compilation.compile_setting(self.settings.compile, device)
        log.info("compile: %s", compiling.reason)
        footprint = memory.footprint_from_configs(memory.ModelConfigs.of_layout(self.layout, lassie.path))
        slot_rank = adapters.slot_rank_for(self.settings.slot_rank, compiling.enabled, DEFAULT_SLOT_RANK)
        memory_plan = memory.plan_memory(device.total_memory if device.is_gpu else None, footprint,
                                         wanted_go_fast.quantizes, slot_rank)
        log.info("%s; extra LoRAs: %s", memory_plan.reason, f"hot-swapped into a rank-{memory_plan.slot_rank} slot"
                 if memory_plan.slot_rank else "one adapter each")
        compile_cache = (compilation.configure_compile_cache(self.settings.compile, self.layout.root, device, compiling)
                         if compiling.enabled else None)
        with timed("loading models"):
            self.models = models.load_models(self.layout, device, vae_slicing=memory_plan.vae_slicing)
            models.prepare_for_speed(self.models, device)
        with timed("loading the safety checker"):
            self.safety = safety.SafetyFilter.load(self.layout, device)
        self.variants = variants.TransformerVariants(self.models, compiling, memory_plan)
        if compile_cache:
            compile_cache.load()
        with timed("preparing transformers (Lassie LoRA, go_fast, compile, warm-up)"):
            self._go_fast = self.variants.prepare(lassie.path, wanted_go_fast)
        log.info("go_fast plan: %s", self._go_fast.reason)
        if compile_cache:
            compile_cache.save()
        self.lora_cache = LoraCache(self.settings.lora, lora_cache_dir)
        log.info("ready; Lassie LoRA %s from %s; trigger word: %r", lassie.path, lassie.origin, lassie.trigger_word)

    def prepare(self, request: Request) -> Prepared:
        """Everything before the GPU: fields checked, images decoded, the plan made (once, from the decoded image), the
        extra LoRA fetched, so a bad field or image is refused before any download. predict.py runs it outside the
        one-at-a-time line: a slow download holds up no other request. The caller releases the result."""
        request = checked(request)
        with timed("reading inputs"):
            decoded = load_inputs(request.image, request.mask)
        plan = make_plan(request, decoded.image_size)
        log.info("seed %d; model %s; mode %s; go_fast %s", plan.seed, plan.model, plan.mode.value, plan.go_fast)
        log.info("%s", describe(plan))
        held = None
        if plan.extra_lora:
            with timed("fetching the extra LoRA"):
                held = self.lora_cache.hold(identify(plan.extra_lora))
        return Prepared(plan, decoded.at(plan.size), held)

    def predict(self, request: Request) -> list[Path]:
        """`prepare` and `predict_prepared` in one call, the held LoRA released at the end."""
        prepared = self.prepare(request)
        try:
            return self.predict_prepared(prepared)
        finally:
            prepared.release()

    def predict_prepared(self, prepared: Prepared) -> list[Path]:
        """The GPU's part of a prediction; its extra LoRA's file is held, so nothing is fetched here. An extra LoRA
        refused for its content leaves the cache."""
        plan, extra = prepared.plan, prepared.extra_lora
        with timed("applying LoRAs"):
            try:
                variant, transformer = self.variants.ready(plan, extra)
            except InputError as error:
                if extra is not None and error.field == EXTRA_LORA_FIELD:
                    self.lora_cache.forget(extra)
                raise
        log.info("precision: %s", self._precision_log.ran(plan.model, plan.go_fast, self._go_fast, self._device.dtype))
        with timed("generating"):
            results = self.variants.run(variant, lambda: generate(
                self.models.pipeline(plan.model, plan.mode, transformer), plan, prepared.inputs))
        if plan.safety_checker:
            with timed("safety checking"):
                results = self.safety.filter(results)
        with timed("encoding"):
            return save_images(results, plan.output_format, plan.output_quality, self._outputs.fresh())
