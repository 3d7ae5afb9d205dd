"""`Lassie`: the one owner of loaded models and active adapters; request -> plan -> images -> files."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from lassie import images as image_io
from lassie.adapters import LoraAdapters
from lassie.encoding import save_images
from lassie.generate import Inputs, generate
from lassie.lora_cache import LoraCache, lora_cache_dir
from lassie.models import Device, FluxModels, load_models
from lassie.provision import ensure_weights
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

    def setup(self) -> None:
        ensure_weights(self.layout)
        device = Device.detect()
        with timed("loading models"):
            self.models = load_models(self.layout, device)
        with timed("loading the safety checker"):
            self.safety = SafetyFilter.load(self.layout, device.torch_device, device.dtype)
        with timed("loading the Lassie LoRA"):
            self.adapters = LoraAdapters(self.models.transformers, self.models.text_encoder)
            self.adapters.add(LASSIE_ADAPTER, self.layout.lassie_lora, field_name="lassie LoRA")
            for model in self.models.transformers:
                self.adapters.activate(model, {LASSIE_ADAPTER: 1.0})
        self.lora_cache = LoraCache(lora_cache_dir(self.layout))
        log.info("ready; trigger word: %r", self.layout.trigger_word())

    def predict(self, request: Request) -> list[Path]:
        plan = make_plan(request)
        log.info("seed %d; model %s; mode %s; go_fast %s", plan.seed, plan.model, plan.mode.value, plan.go_fast)
        with timed("reading inputs"):
            plan, inputs = self._read_inputs(plan, request)
        log.info("size %dx%d, %d steps, %d output(s)", *plan.size, plan.num_inference_steps, plan.num_outputs)
        with timed("applying LoRAs"):
            self._activate_loras(plan)
        with timed("generating"):
            pipeline = self.models.pipeline(plan.model, plan.mode)
            results = generate(pipeline, plan, inputs)
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
        image = image.resize(size, image_io.Image.Resampling.LANCZOS) if image.size != size else image
        mask = image_io.load_mask(Path(request.mask), size) if plan.mode is Mode.INPAINT else None
        return replace(plan, size=size), Inputs(image=image, mask=mask)

    def _activate_loras(self, plan: Plan) -> None:
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
            self.adapters.activate(plan.model, scales)
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
