"""The one owner of runnable transformers: the bf16 and go_fast variants of dev and schnell, their LoRA adapters,
compilation and warm-up, so no request compiles (docs/go_fast.md, "Compile, and switching LoRAs without
recompiling")."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from lassie.engine.adapters import LoraAdapters
from lassie.engine.compilation import CompileSetting, compile_transformer
from lassie.engine.generate import Inputs, pipeline_arguments
from lassie.engine.go_fast import FastMode, GoFastPlan, decide_go_fast, quantize_transformer
from lassie.engine.internals import FLUX_BLOCK_BATCH_DIMENSIONS, compiled_graph_count, raised_in_compiled_code
from lassie.engine.memory import MemoryPlan
from lassie.engine.models import FluxModels
from lassie.fetch.lora_cache import HeldLora
from lassie.request.plan import GO_FAST_LORA_MULTIPLIER, Mode, Plan, Request, make_plan

log = logging.getLogger(__name__)

LASSIE_ADAPTER = "lassie"
# The Lassie scale of go_fast=false and go_fast=true default requests (lora_scale 1), held after setup.
DEFAULT_LASSIE_SCALE = {False: 1.0, True: GO_FAST_LORA_MULTIPLIER}
# The Lassie scale warm-up runs (any value: scales are graph inputs).
WARM_UP_LASSIE_SCALE = 0.5
WARM_UP_SIZE = (256, 256)
WARM_UP_OUTPUTS = 1
# Regional compilation compiles one graph per block class: FLUX's double and single blocks.
BLOCK_CLASSES = 2
# Extra LoRAs kept converted after their request, so switching back reads and converts nothing. With the slot a kept
# LoRA costs host memory only; without, each stays a named adapter on the device, so only the last is kept.
KEPT_EXTRA_LORAS = 4
T = TypeVar("T")
# What torch raises (a plain RuntimeError) when a call under `fail_on_recompile` needs a new graph.
RECOMPILE_REFUSED = "Detected recompile when torch.compile stance is 'fail_on_recompile'"
GUARD_LINE = re.compile(r"^\s*- \d+/\d+: (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Variant:
    """A runnable transformer: `go_fast` is the model's go_fast copy (fp8 where the hardware has it)."""

    model: str
    go_fast: bool

    def __str__(self) -> str:
        return f"{self.model} go_fast" if self.go_fast else self.model


def plan_warm_up(go_fast_copies: bool) -> list[Variant]:
    """The variants warm-up calls once each, one per precision: sizes, batch sizes, scales and the slot's contents are
    graph inputs, and dev and schnell share their block classes, so warming dev covers schnell."""
    return [Variant("dev", False)] + ([Variant("dev", True)] if go_fast_copies else [])


def planned_graphs(runs: list[Variant]) -> int:
    """Each warm-up call compiles one graph per block class; no two calls share a precision."""
    return len(runs) * BLOCK_CLASSES


class TransformerVariants:
    def __init__(self, models: FluxModels, compile_setting: CompileSetting, memory: MemoryPlan) -> None:
        self._models = models
        self._compile = compile_setting
        self._memory = memory
        self._transformers = {Variant(model, False): transformer for model, transformer in models.transformers.items()}
        self.adapters: LoraAdapters  # made by `prepare`, over the go_fast copies too
        self._extras: list[str] = []  # kept extra LoRAs, the most recently used last
        self._stance: str | None = None
        self._eager_variants: set[Variant] = set()  # variants whose compiled call failed after warm-up (`run`)

    def prepare(self, lassie_lora: Path, wanted: GoFastPlan) -> GoFastPlan:
        """Lassie on every variant, the go_fast copies `wanted` needs where the memory plan holds them, compile and
        warm-up: then no request loads or compiles anything but an extra LoRA. Returns `decide_go_fast`'s decision."""
        build = wanted.quantizes and self._memory.go_fast_copies
        build_failure = self._build_go_fast_copies(wanted.mode) if build else None
        go_fast = decide_go_fast(wanted, self._memory.go_fast_copies, self._memory.reason, build_failure)
        self.adapters = LoraAdapters(self._transformers, self._models.text_encoder, slot_rank=self._memory.slot_rank)
        self.adapters.add(LASSIE_ADAPTER, lassie_lora, pinned=True)
        for variant in self._transformers:
            self.adapters.activate(variant, {LASSIE_ADAPTER: DEFAULT_LASSIE_SCALE[variant.go_fast]})
        if self._compile.enabled:
            self._compile_and_warm_up()
        return go_fast

    def transformer(self, variant: Variant) -> nn.Module:
        return self._transformers[variant]

    def ready(self, plan: Plan, extra: HeldLora | None) -> tuple[Variant, nn.Module]:
        """The plan's variant with Lassie and `extra` (its cache key the adapter's name) active at the plan's scales. A
        new extra LoRA joins the kept ones (`KEPT_EXTRA_LORAS`); one that fails to load leaves the previous state."""
        variant = Variant(plan.model, plan.go_fast and Variant(plan.model, True) in self._transformers)
        scales = {LASSIE_ADAPTER: plan.lora_scale}
        if extra is not None:
            name = extra.lora.key
            new = name not in self.adapters.names()
            if new:
                self.adapters.add(name, extra.path)
            scales[name] = plan.extra_lora_scale
        try:
            self.adapters.activate(variant, scales)
        except Exception:
            if extra is not None and new:
                self.adapters.remove(name)
            raise
        if extra is not None:  # the most recently used last; the least recently used beyond the limit are removed
            self._extras = [kept for kept in self._extras if kept != name and kept in self.adapters.names()] + [name]
            while len(self._extras) > (KEPT_EXTRA_LORAS if self.adapters.slot_rank else 1):
                self.adapters.remove(self._extras.pop(0))
        log.info("LoRA scales: %s", ", ".join(f"{name}={scale:g}" for name, scale in scales.items()))
        return variant, self._transformers[variant]

    def run(self, variant: Variant, call: Callable[[], T]) -> T:
        """`call` (one pipeline call of `variant`) under `fail_on_recompile` after warm-up; one needing a graph warm-up
        did not make runs under `eager_on_recompile` (a warning names the failed guards). One failing otherwise in
        torch's compiler runs again eagerly: if that works the variant stays eager; if not, the error is the request's,
        not the compiler's, and the variant stays compiled."""
        if self._stance is None:
            return call()
        stance = "force_eager" if variant in self._eager_variants else self._stance
        try:
            with torch.compiler.set_stance(stance):
                return call()
        except Exception as error:  # interrupts (cog's CancelationException, KeyboardInterrupt) are BaseExceptions
            if isinstance(error, RuntimeError) and str(error).startswith(RECOMPILE_REFUSED):
                log.warning("this request needs a graph warm-up did not compile; running it without compiling "
                            "the missing graph (guards that failed: %s)", _guard_failures(str(error)))
                with torch.compiler.set_stance("eager_on_recompile"):
                    return call()
            if stance == "force_eager" or not raised_in_compiled_code(error):
                raise
            failure = _one_line(error)  # text only: the traceback's frames would keep the failed call's tensors
        try:
            with torch.compiler.set_stance("force_eager"):
                result = call()
        except Exception:
            log.warning("%s: a compiled call failed (%s) and so did the same call run eagerly", variant, failure)
            raise
        self._eager_variants.add(variant)
        log.warning("%s: a compiled call failed (%s); served eagerly, and %s runs eagerly from now on", variant,
                    failure, variant)
        return result

    def _build_go_fast_copies(self, mode: FastMode) -> str | None:
        """The go_fast copies of both transformers, or what went wrong (one line): then go_fast runs the bf16 ones."""
        started = time.perf_counter()
        try:
            copies = {model: quantize_transformer(module, mode) for model, module in self._models.transformers.items()}
        except Exception as error:
            failure = _one_line(error)
            log.warning("go_fast: building the %s transformers failed (%s); go_fast runs the bf16 transformers",
                        mode.value, failure)
            return failure
        self._transformers.update({Variant(model, True): go_fast_copy for model, go_fast_copy in copies.items()})
        log.info("built the %s go_fast transformers in %.1fs", mode.value, time.perf_counter() - started)
        return None

    def warm_up_plan(self) -> list[Variant]:
        return plan_warm_up(any(variant.go_fast for variant in self._transformers))

    def _compile_and_warm_up(self) -> None:
        runs = self.warm_up_plan()
        graphs_before = compiled_graph_count()
        started = time.perf_counter()
        try:
            for variant in self._transformers:
                compile_transformer(self.transformer(variant), self._compile)
            # The blocks' batch dimensions traced as unbacked sizes: a backed size 1 is specialised (torch's 0/1
            # specialisation, also with `dynamic=True`; `backed_size_oblivious` still guards batch != 1 at the
            # attention output's `.contiguous()`). Unbacked, one graph serves every batch. Only tracing reads this.
            with torch.compiler.config.patch(unbacked_sources=FLUX_BLOCK_BATCH_DIMENSIONS):
                for variant in runs:
                    self._warm(variant)
        except Exception as error:
            self._stance = "force_eager"
            log.warning("compiling failed during warm-up (%s); serving uncompiled", _one_line(error))
            return
        self._stance = "fail_on_recompile"
        log.info("warm-up compiled %d graphs (backend %s, mode %s) with %d calls in %.1fs; %d planned",
                 compiled_graph_count() - graphs_before, self._compile.backend, self._compile.mode,
                 len(runs), time.perf_counter() - started, planned_graphs(runs))

    def _warm(self, variant: Variant) -> None:
        """One small step with every request's adapter set, stopping at the latents (the VAE is not compiled)."""
        self.adapters.activate(variant, {LASSIE_ADAPTER: WARM_UP_LASSIE_SCALE})
        plan = make_plan(Request(prompt="warm-up", model=variant.model, num_inference_steps=1, seed=0,
                                 num_outputs=WARM_UP_OUTPUTS))
        pipeline = self._models.pipeline(variant.model, Mode.TXT2IMG, self.transformer(variant))
        arguments = pipeline_arguments(replace(plan, size=WARM_UP_SIZE), Inputs()) | {"output_type": "latent"}
        with torch.inference_mode():
            pipeline(**arguments)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The error on one line: torch's BackendCompilerFailed puts the backend's own error on the next."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or "no message"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + "..."


def _guard_failures(message: str, shown: int = 3) -> str:
    """The distinct guards torch's message lists (one per cached graph), without their comments."""
    guards = list(dict.fromkeys(match.group(1).split("  #")[0].strip() for match in GUARD_LINE.finditer(message)))
    if not guards:
        return message.splitlines()[0]
    more = f"; and {len(guards) - shown} more" if len(guards) > shown else ""
    return "; ".join(guards[:shown]) + more
