"""`Lassie`: the one owner of loaded models and active adapters; request -> plan -> images -> files."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lassie.compilation import compile_setting, configure_compile_cache
from lassie.encoding import save_images
from lassie.generate import generate
from lassie.go_fast import PrecisionLog, plan_go_fast, precision_of, requested_mode
from lassie.hardware import DeviceInfo, query_device
from lassie.images import load_inputs
from lassie.lora.adapters import slot_ranks_for
from lassie.lora.cache import LoraCache
from lassie.memory import ModelConfigs, footprint_from_configs, plan_memory, ranks_text
from lassie.models import FluxModels, load_models, prepare_for_speed
from lassie.provision import ensure_weights
from lassie.request import Plan, Request, checked, describe, make_plan
from lassie.safety import SafetyFilter
from lassie.settings import DEFAULT_SLOT_RANKS, Settings
from lassie.variants import TransformerVariants
from lassie.weights import WeightsLayout

log = logging.getLogger(__name__)

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
        self.models: FluxModels | None = None
        self.variants: TransformerVariants | None = None
        self.lora_cache: LoraCache | None = None
        self.safety: SafetyFilter | None = None
        self._output_dir: Path | None = None
        self._device: DeviceInfo | None = None
        self._precision_log = PrecisionLog()

    def setup(self) -> None:
        ensure_weights(self.layout, self.settings)
        hardware = query_device()
        self._device = hardware
        go_fast = plan_go_fast(hardware, requested_mode(self.settings.go_fast_mode))
        compiling = compile_setting(self.settings.compile, hardware)
        log.info("go_fast plan: %s; compile: %s", go_fast.reason, compiling.reason)
        slot_ranks = slot_ranks_for(self.settings.slot_ranks, compiling.enabled, DEFAULT_SLOT_RANKS)
        memory = plan_memory(hardware.total_memory if hardware.is_gpu else None,
                             footprint_from_configs(ModelConfigs.of_layout(self.layout)), go_fast.quantizes, slot_ranks,
                             self.settings.speed.prompt_cache)
        log.info("%s; extra LoRAs: %s", memory.reason,
                 f"hot-swapped into the narrowest slot that fits ({ranks_text(memory.slot_ranks)})"
                 if memory.slot_ranks else "one adapter each")
        if compiling.enabled:
            configure_compile_cache(self.settings.compile, self.layout.root)
        with timed("loading models"):
            self.models = load_models(self.layout, hardware, vae_slicing=memory.vae_slicing,
                                      prompt_cache=self.settings.speed.prompt_cache)
            prepare_for_speed(self.models, hardware, self.settings.speed.attention_backend)
        with timed("loading the safety checker"):
            self.safety = SafetyFilter.load(self.layout, hardware)
        self.variants = TransformerVariants(self.models, go_fast, compiling, memory, self.settings.speed)
        with timed("preparing transformers (Lassie LoRA, go_fast, compile, warm-up)"):
            self.variants.prepare(self.layout.lassie_lora)
        self.lora_cache = LoraCache(self.settings.lora, self.layout.lora_cache_dir)
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
                results = self.safety.filter(results)
        with timed("encoding"):
            return save_images(results, plan.output_format, plan.output_quality, self._fresh_output_dir())

    def _log_precision(self, plan: Plan) -> None:
        self._precision_log.ran(plan.model, plan.go_fast, self.variants.go_fast_plan, self._device.dtype)
        log.info("precision: %s", precision_of(self.variants.go_fast_plan, plan.go_fast, self._device.dtype))

    def _fresh_output_dir(self) -> Path:
        """Outputs of the previous prediction have been served by now: reuse no names across calls."""
        if self._output_dir is not None:
            shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir = Path(tempfile.mkdtemp(prefix="lassie-out-"))
        return self._output_dir
