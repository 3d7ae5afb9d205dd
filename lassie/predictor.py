"""`Lassie`: the one owner of loaded models and active adapters; request -> plan -> images -> files."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lassie.encoding import save_images
from lassie.generate import generate
from lassie.images import load_inputs
from lassie.lora.adapters import SLOT_RANK, slot_rank_for
from lassie.lora.cache import LoraCache
from lassie.memory import ModelConfigs, footprint_from_configs, plan_memory
from lassie.models import Device, FluxModels, load_models, prepare_for_speed
from lassie.provision import ensure_weights
from lassie.quantization import (
    COMPILE_BACKEND_ENV,
    COMPILE_ENV,
    GO_FAST_MODE_ENV,
    PrecisionLog,
    compile_setting,
    configure_compile_cache,
    plan_go_fast,
    precision_of,
    query_device,
    requested_mode,
)
from lassie.request import Plan, Request, checked, describe, make_plan
from lassie.safety import SafetyFilter
from lassie.settings import Settings
from lassie.variants import TransformerVariants
from lassie.weights import WeightsLayout, default_weights_dir

log = logging.getLogger(__name__)

@contextmanager
def timed(phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    log.info("%s took %.2fs", phase, time.perf_counter() - started)


class Lassie:
    def __init__(self, weights_dir: Path | None = None) -> None:
        self.layout = WeightsLayout(Path(weights_dir) if weights_dir else default_weights_dir())
        self.models: FluxModels | None = None
        self.variants: TransformerVariants | None = None
        self.lora_cache: LoraCache | None = None
        self.safety: SafetyFilter | None = None
        self._output_dir: Path | None = None
        self._device: Device | None = None
        self._precision_log = PrecisionLog()

    def setup(self) -> None:
        settings = Settings.from_env()
        ensure_weights(self.layout, settings)
        hardware = query_device()
        self._device = Device.for_hardware(hardware.is_gpu)
        go_fast = plan_go_fast(hardware, requested_mode(os.environ.get(GO_FAST_MODE_ENV)))
        compiling = compile_setting(os.environ.get(COMPILE_ENV), os.environ.get(COMPILE_BACKEND_ENV), hardware)
        log.info("go_fast plan: %s; compile: %s", go_fast.reason, compiling.reason)
        slot_rank = slot_rank_for(settings.slot_rank, compiling.enabled, SLOT_RANK)
        memory = plan_memory(hardware.total_memory if hardware.is_gpu else None,
                             footprint_from_configs(ModelConfigs.of_layout(self.layout)), go_fast.quantizes, slot_rank)
        log.info("%s; extra LoRAs: %s", memory.reason,
                 f"hot-swapped into a rank-{memory.slot_rank} slot" if memory.slot_rank else "one adapter each")
        if compiling.enabled:
            configure_compile_cache(self.layout.root)
        with timed("loading models"):
            self.models = load_models(self.layout, self._device, vae_slicing=memory.vae_slicing)
            prepare_for_speed(self.models, hardware)
        with timed("loading the safety checker"):
            self.safety = SafetyFilter.load(self.layout, self._device.torch_device, self._device.dtype)
        self.variants = TransformerVariants(self.models, go_fast, compiling, memory)
        with timed("preparing transformers (Lassie LoRA, go_fast, compile, warm-up)"):
            self.variants.prepare(self.layout.lassie_lora)
        self.lora_cache = LoraCache(settings.lora, self.layout.lora_cache_dir)
        log.info("ready; trigger word: %r", self.layout.trigger_word())

    def predict(self, request: Request) -> list[Path]:
        """Fields are checked before any image is decoded; the plan is made once, from the decoded image."""
        request = checked(request)
        with timed("reading inputs"):
            decoded = load_inputs(request.image, request.mask)
        plan = make_plan(request, decoded.image_size)
        inputs = decoded.at(plan.size)
        log.info("seed %d; model %s; mode %s; go_fast %s", plan.seed, plan.model, plan.mode.value, plan.go_fast)
        log.info("%s", describe(plan))
        with timed("applying LoRAs"):
            variant = self.variants.variant_for(plan.model, plan.go_fast)
            extra = None
            if plan.extra_lora:
                with timed("fetching the extra LoRA"):
                    extra = self.lora_cache.fetch(plan.extra_lora)
            transformer = self.variants.ready(variant, plan.lora_scale, extra, plan.extra_lora_scale)
        self._log_precision(plan)
        with timed("generating"):
            results = self.variants.run(lambda: generate(self.models.pipeline(plan.model, plan.mode, transformer),
                                                         plan, inputs, self.models.prompts))
        if plan.safety_checker:
            with timed("safety checking"):
                results = self.safety.filter(results).kept
        with timed("encoding"):
            return save_images(results, plan.output_format, plan.output_quality, self._fresh_output_dir())

    def _log_precision(self, plan: Plan) -> None:
        self._precision_log.ran(plan.model, plan.go_fast, self.variants.go_fast, self._device.dtype)
        log.info("precision: %s", precision_of(self.variants.go_fast, plan.go_fast, self._device.dtype))

    def _fresh_output_dir(self) -> Path:
        """Outputs of the previous prediction have been served by now: reuse no names across calls."""
        if self._output_dir is not None:
            shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir = Path(tempfile.mkdtemp(prefix="lassie-out-"))
        return self._output_dir
