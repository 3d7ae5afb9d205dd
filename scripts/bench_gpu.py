"""GPU benchmark: lassie's `predict()` at full FLUX size against plain diffusers, in one command.

Real FLUX weights cannot be fetched where this runs, so every big model (both transformers,
T5-XXL, CLIP-L, the VAE) is built from the public configs in scripts/flux_configs with random
weights straight on the GPU: the weights directory holds configs, tokenizers and LoRAs only
(about 1.3 GB, nothing like 58 GB), and in this script's processes the library loaders
(`from_pretrained` of those four classes) materialise a directory marked
`bench-random-weights.json` on the device instead of reading files. The product itself runs
unchanged through its public surface: `Lassie(settings).setup()`, `.predict(Request(...))`
and its environment settings (LASSIE_COMPILE, LASSIE_COMPILE_BACKEND, LASSIE_GO_FAST_MODE...).

Sections, each in its own process (a clean GPU, its own peak memory), in this order:
- product: setup (load, quantize, compile, warm-up), then timed requests interleaved round by
  round, the headline ones first: dev 28 steps and schnell 4 steps at 1024x1024, bf16 and go_fast,
  other lora_scales, a new prompt every request, a cached extra LoRA and switching between two, a
  rank-64 extra against the rank-16 one (the same rank-128 hot-swap slot by default); PSNR of go_fast
  against bf16 (at the 1.5x LoRA scale go_fast applies, so only the precision differs);
- baselines: plain diffusers on the same weights, no LoRA: bf16 eager, bf16 +
  `compile_repeated_blocks`, torchao fp8 + `compile_repeated_blocks`, same calls and encoding;
- h100: the plan an 80 GB H100 gets, simulated here (the allocator capped at 79 GiB with
  `torch.cuda.set_per_process_memory_fraction`, the device reported as 79 GiB), setup with the
  compile cache the product section left warm, model switches, and the peak;
- warm-setup (full runs only): setup of the H200 plan again with a warm compile cache.
Every request's time is split into phases by timing wrappers on the library methods the
pipeline calls (text encoding, denoising, VAE decode, to PIL, image encoding, the rest).

A preflight runs first and exits with status 2, building nothing, where an import or CUDA is
missing, printing the install line (docs/benchmarks.md: carrying wheels to a machine without
network). Each section stops at the budget (`--budget-s`), and the table is printed with
what was measured: a markdown table, dated, with the hardware, that docs/benchmarks.md keeps.

Usage: python scripts/bench_gpu.py [--quick] [--dry-run] [--repeats N] [--budget-s S]
                                   [--sections a,b] [--work-dir DIR] [--out FILE]
`--dry-run` runs the same sections on CPU with tiny weights, small sizes and few steps,
skipping what needs CUDA: the suite runs it. `--print-wheels` lists the pinned wheels that
scripts/carry_wheels.sh downloads. Only the standard library is imported before the preflight.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_gpu")

MISSING_EXIT = 2
GIB = 2**30
CONFIGS = REPO / "scripts" / "flux_configs"
RANDOM_MARKER = "bench-random-weights.json"
WEIGHTS_MARKER = "bench-weights.json"
PROMPT = "a photo of LSSIE the dog on a beach"
TRAFFIC_REQUESTS = 100
TRAFFIC_REQUESTS_QUICK = 30
TRAFFIC_REQUESTS_DRY_RUN = 4
SEED = 1234
H100_MEMORY = int(79.19 * GIB)  # what torch reports for an 80 GB H100
# A device call has 15 minutes of device time, the machine's start included, and 10 minutes a
# command: a quick run keeps to 9, so the command ends inside its 10 with the wheels' install.
QUICK_BUDGET_S = 540
KILL_GRACE_S = 20
STOP_MARGIN_S = 15

# Import to check -> distribution to install. Versions come from pyproject.toml, or CARRY_PINS
# for the dependencies of carried wheels that the project does not list itself.
PREFLIGHT_IMPORTS = {
    "torch": "torch",
    "numpy": "numpy",
    "diffusers": "diffusers",
    "torchao.quantization": "torchao",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "safetensors.torch": "safetensors",
    "PIL.Image": "pillow",
    "requests": "requests",
    "huggingface_hub": "huggingface_hub",
    "httpx2": "httpx2",
    "lassie.predictor": "lassie",
}
# Only the GPU run needs these: with torchvision present, transformers builds the safety model's
# image processor on it, so one that does not match the machine's torch fails setup there (the
# device image's torch 2.11 comes with torchvision 0.26; without torchvision, as here, transformers
# falls back to its PIL processor).
GPU_RUN_IMPORTS = {"torchvision.transforms.v2": "torchvision"}
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}
MODULE_NOT_FOUND = re.compile(r"No module named '([\w.]+)'")
# What the GPU machine lacks (docs/benchmarks.md), and the needs of those wheels it lacks too.
CARRIED = ("diffusers", "torchao", "httpx2", "httpcore2", "truststore")
CARRY_PINS = {"httpcore2": "2.16.2", "truststore": "0.10.5"}
NEVER_CARRIED = ("torch", "torchvision")


# --- preflight -------------------------------------------------------------------------------


def pinned_versions() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(requirement.split("==", 1) for requirement in project)
    return {**pins, **CARRY_PINS}


def wheel_pins() -> list[str]:
    pins = pinned_versions()
    return [f"{name}=={pins[name]}" for name in CARRIED]


def distribution_of(module: str) -> str:
    root = module.split(".")[0]
    return DISTRIBUTIONS.get(root, root)


def missing_module(error: ImportError) -> str | None:
    """The module an import failed on. `error.name` is that module only when the import system set
    it: libraries raise ImportError(message), or put a whole message there; then the message's
    "No module named 'x'" names it, or nothing does."""
    name = error.name or ""
    if re.fullmatch(r"[A-Za-z_][\w.]*", name):
        return name
    found = MODULE_NOT_FOUND.search(str(error)) or MODULE_NOT_FOUND.search(name)
    return found.group(1) if found else None


def missing_imports(imports: dict[str, str]) -> dict[str, str]:
    """distribution -> why, for every import of `imports` that fails (a missing dependency of a
    present package is named itself, so the install line is the one that fixes it)."""
    missing: dict[str, str] = {}
    for module, distribution in imports.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            culprit = missing_module(error)
            missing.setdefault(distribution_of(culprit) if culprit else distribution, f"import {module}: {error}")
        except Exception as error:  # a broken install is a miss too, reported, not raised
            missing.setdefault(distribution, f"import {module}: {type(error).__name__}: {error}")
    return missing


def install_advice(missing: dict[str, str]) -> str:
    pins = pinned_versions()
    installable = [name for name in missing if name not in NEVER_CARRIED and name != "lassie"]
    lines = [f"  {name}: {why}" for name, why in missing.items()]
    if installable:
        wanted = " ".join(f"{name}=={pins[name]}" if name in pins else name for name in installable)
        lines += ["install (with network):", f"  python3 -m pip install {wanted}",
                  "without network (see docs/benchmarks.md): run `bash scripts/carry_wheels.sh` where pip works, "
                  "then here:",
                  "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                  "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"]
    if "torch" in missing:
        lines.append("torch is never installed by this benchmark: run it with the python that has the machine's torch")
    if "torchvision" in missing:
        lines.append("torchvision must be the build made for this torch (torch 2.11: torchvision 0.26), "
                     "from the machine's image: it is never carried")
    return "\n".join(lines)


def preflight(dry_run: bool) -> None:
    """Before anything is built: every import the sections need, CUDA unless this is a dry run,
    then what only a GPU run needs."""
    missing = missing_imports(PREFLIGHT_IMPORTS)
    if missing:
        exit_missing(missing)
    import torch

    if not dry_run and not torch.cuda.is_available():
        print(f"bench_gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none on this machine; nothing "
              "was run. Run it where a GPU is lent (docs/benchmarks.md), or use --dry-run for the CPU path.",
              file=sys.stderr)
        raise SystemExit(MISSING_EXIT)
    missing = {} if dry_run else missing_imports(GPU_RUN_IMPORTS)
    if missing:
        exit_missing(missing)


def exit_missing(missing: dict[str, str]) -> None:
    print("bench_gpu.py cannot run: imports are missing; nothing was run.\n" + install_advice(missing),
          file=sys.stderr)
    raise SystemExit(MISSING_EXIT)


# --- what runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    quick: bool
    dry_run: bool
    repeats: int
    work: Path
    deadline: float | None

    @property
    def megapixels(self) -> str:
        return "0.25" if self.dry_run else "1"

    @property
    def size(self) -> int:
        return 512 if self.dry_run else 1024

    def steps(self, model: str) -> int:
        if self.dry_run:
            return {"dev": 2, "schnell": 1}[model]
        return {"dev": 28, "schnell": 4}[model]

    @property
    def lora_ranks(self) -> dict[str, int]:
        if self.dry_run:
            return {"lassie": 4, "extra-a": 4, "extra-b": 8, "extra-wide": 6}
        return {"lassie": 16, "extra-a": 16, "extra-b": 32, "extra-wide": 64}

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def out_of_time(self, margin: float = STOP_MARGIN_S) -> bool:
        return self.time_left() < margin


@dataclass(frozen=True)
class Case:
    """One kind of request, timed once per round. `previous_extra`: an untimed request with that
    extra LoRA runs just before, so the timed one is a repeat (the same extra) or a switch."""

    name: str
    model: str
    go_fast: bool
    lora_scale: float = 1.0
    extra: str | None = None
    previous_extra: str | None = None
    fresh_prompt: bool = False
    target_s: float | None = None
    target_ratio: float | None = None  # at most this times the fp8 + compile baseline
    anchor: str = ""
    full_only: bool = False

    def step_count(self, options: Options) -> int:
        return options.steps(self.model)

    def request(self, options: Options, round_index: int, base_url: str, extra_name: str | None = None):
        from lassie.request.plan import Request

        extra_name = extra_name or self.extra
        extra = f"{base_url}/{extra_name}.safetensors" if extra_name else None
        prompt = f"{PROMPT}, take {round_index}" if self.fresh_prompt else PROMPT
        return Request(prompt=prompt, model=self.model, num_inference_steps=self.step_count(options),
                       aspect_ratio="1:1", megapixels=options.megapixels, seed=SEED, go_fast=self.go_fast,
                       lora_scale=self.lora_scale, extra_lora=extra, disable_safety_checker=True)


SAME_EXTRA = "schnell go_fast + extra LoRA, same as before"
# A rank-64 extra beside the rank-16 extra-a: both run in the one rank-128 slot, so their ratio
# shows a slot costs its own rank whatever the LoRA.
WIDE_SLOT = ("schnell go_fast + a rank-64 extra LoRA, same as before", SAME_EXTRA)
CASES = (
    Case("dev bf16", "dev", False, target_s=3.5, anchor="diffusers bf16 eager 6.6-6.9 s; + torch.compile 4.2-4.5 s"),
    Case("dev go_fast", "dev", True, target_s=2.0, target_ratio=0.75,
         anchor="torchao fp8 + compile 3.0-3.2 s; flux-fp8-api 2.4 s (denoising); Replicate go_fast 3.03 s"),
    Case("schnell go_fast", "schnell", True, target_s=0.35, target_ratio=0.75, anchor="Replicate go_fast 0.72 s"),
    Case("dev go_fast, lora_scale 0.8", "dev", True, lora_scale=0.8, full_only=True),
    Case("dev go_fast, new prompt each request", "dev", True, fresh_prompt=True, full_only=True),
    Case("dev go_fast + extra LoRA", "dev", True, extra="extra-a", previous_extra="extra-a", full_only=True,
         anchor="diffusers hotswap + FA3 + fp8 + compile, with a LoRA 3.55 s"),
    Case("schnell bf16", "schnell", False),
    Case("schnell go_fast, lora_scale 0.7", "schnell", True, lora_scale=0.7),
    Case(SAME_EXTRA, "schnell", True, extra="extra-a", previous_extra="extra-a"),
    Case("schnell go_fast, switching to another cached extra LoRA", "schnell", True, extra="extra-b",
         previous_extra="extra-a"),
    Case(WIDE_SLOT[0], "schnell", True, extra="extra-wide", previous_extra="extra-wide"),
)
SWITCH = ("schnell go_fast, switching to another cached extra LoRA", SAME_EXTRA)
SWITCH_TARGET_S = 0.5
WARM_SETUP_TARGET_S = 90.0
BASELINE_RECIPES = ("bf16 eager", "torchao fp8 + compile", "bf16 + compile")  # cheapest and most wanted first
QUICK_BASELINE_RECIPES = ("torchao fp8 + compile", "bf16 eager")  # the headline comparison first


@dataclass(frozen=True)
class Section:
    name: str
    what: str
    needs_cuda: bool = False
    full_only: bool = False
    reserve_s: float = 0.0  # of the budget, kept back for the sections after this one


SECTIONS = (
    Section("product", "lassie on this GPU's plan: setup, then every request case", reserve_s=300),
    Section("baselines", "plain diffusers, same weights, calls and encoding, no LoRA: " + ", ".join(BASELINE_RECIPES)
            + " (quick: " + ", then ".join(QUICK_BASELINE_RECIPES) + ")", reserve_s=190),
    Section("h100", "lassie on the plan of an 80 GB H100 (memory capped at 79 GiB), warm compile cache",
            needs_cuda=True),
    Section("warm-setup", "lassie setup on this GPU's plan again, warm compile cache", needs_cuda=True,
            full_only=True),
)


def chosen_cases(options: Options) -> list[Case]:
    return [case for case in CASES if not (case.full_only and options.quick)]


def chosen_sections(options: Options, names: list[str] | None) -> list[Section]:
    sections = [section for section in SECTIONS if not (section.full_only and options.quick)]
    if names:
        unknown = set(names) - {section.name for section in SECTIONS}
        if unknown:
            raise SystemExit(f"--sections: unknown {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(s.name for s in SECTIONS)}")
        sections = [section for section in SECTIONS if section.name in names]
    return sections


def describe_plan(options: Options, sections: list[Section]) -> str:
    budget = "none" if options.deadline is None else f"{options.time_left():.0f} s"
    lines = [f"bench_gpu plan: {'dry run (CPU, tiny weights)' if options.dry_run else 'full-size random weights'}, "
             f"{'quick' if options.quick else 'full'}, {options.repeats} timed rounds after a warm-up round, "
             f"budget {budget}, {options.size}x{options.size}, dev {options.steps('dev')} steps, "
             f"schnell {options.steps('schnell')} steps"]
    for section in sections:
        skip = " (skipped: needs CUDA)" if section.needs_cuda and options.dry_run else ""
        lines.append(f"- {section.name}: {section.what}{skip}")
    lines.append("- requests: " + "; ".join(case.name for case in chosen_cases(options)))
    if any(section.name == "h100" for section in sections):
        lines.append(f"- h100: allocator capped at {H100_MEMORY / GIB:.2f} GiB, device reported as that size")
    knobs = {name: value for name, value in os.environ.items() if name.startswith("LASSIE_")}
    lines.append("- settings: " + (", ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "product defaults"))
    return "\n".join(lines)


# --- results: JSON lines each section appends as it measures, so a stopped one keeps its part ----


class Sink:
    def __init__(self, path: Path, section: str) -> None:
        self.path = path
        self.section = section

    def write(self, kind: str, **record) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, "section": self.section, **record}) + "\n")

    def note(self, text: str) -> None:
        log.info("%s: %s", self.section, text)
        self.write("note", text=text)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- random weights: configs on disk, tensors materialised where they run ---------------------


def load_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# model directory -> (full-size config in scripts/flux_configs, weights file stem)
RANDOM_MODELS = {
    "flux-dev/transformer": ("dev_transformer", "diffusion_pytorch_model"),
    "flux-schnell/transformer": ("schnell_transformer", "diffusion_pytorch_model"),
    "flux-dev/vae": ("vae", "diffusion_pytorch_model"),
    "flux-dev/text_encoder": ("clip_text_encoder", "model"),
    "flux-dev/text_encoder_2": ("t5_text_encoder", "model"),
}
SCHEDULER_CONFIGS = {"flux-dev/scheduler": "dev_scheduler", "flux-schnell/scheduler": "schnell_scheduler"}


def weights_fingerprint(options: Options) -> dict:
    digest = hashlib.sha256()
    for path in sorted(CONFIGS.glob("*.json")):
        digest.update(path.read_bytes())
    return {"full_size": not options.dry_run, "ranks": options.lora_ranks, "configs": digest.hexdigest()[:16]}


def ensure_bench_weights(options: Options) -> Path:
    """The weights directory: the tiny builder's layout (tokenizers, safety models), big model
    directories reduced to their config plus an empty shard index, and the LoRAs. Reused when
    an earlier section of this run (or an earlier run) built the same."""
    weights = options.work / "weights"
    marker = weights / WEIGHTS_MARKER
    fingerprint = weights_fingerprint(options)
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return weights
    import make_tiny_weights  # scripts/ is on sys.path when this script runs

    started = time.perf_counter()
    shutil.rmtree(weights, ignore_errors=True)
    make_tiny_weights.build(weights)
    for index, (directory, (config, stem)) in enumerate(RANDOM_MODELS.items()):
        mark_random(weights / directory, stem, seed=index, config=None if options.dry_run else load_config(config))
    if not options.dry_run:
        for directory, config in SCHEDULER_CONFIGS.items():
            (weights / directory / "scheduler_config.json").write_text(json.dumps(load_config(config), indent=2))
    write_loras(weights, options)
    marker.write_text(json.dumps(fingerprint))
    log.info("bench weights written to %s in %.1fs", weights, time.perf_counter() - started)
    return weights


def mark_random(directory: Path, stem: str, seed: int, config: dict | None) -> None:
    """Weights replaced by the marker and an empty shard index (the layout check still passes)."""
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    for path in directory.glob(f"{stem}*.safetensors*"):
        path.unlink()
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (directory / RANDOM_MARKER).write_text(json.dumps({"seed": seed}))


def model_classes() -> list[type]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    return [FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel]


@contextmanager
def default_dtype(dtype) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def materialise(cls: type, directory: Path, dtype, device: str):
    """The model of `directory`'s config, built on `device` in `dtype` with the classes' own
    random init (so buffers are right), seeded from the marker: every process gets the same."""
    import torch
    from transformers import PreTrainedModel

    seed = json.loads((directory / RANDOM_MARKER).read_text())["seed"]
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        if issubclass(cls, PreTrainedModel):
            model = cls(cls.config_class.from_pretrained(directory))
        else:
            model = cls.from_config(cls.load_config(directory))
    return model.eval()


class RandomLoader:
    """Wraps `from_pretrained` of the big model classes: a marked directory is materialised on
    this process's device; any other path loads as usual. Counts the seconds it spends."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0

    def install(self) -> None:
        for cls in model_classes():
            self._wrap(cls)

    def _wrap(self, cls: type) -> None:
        original = cls.from_pretrained
        loader = self

        def from_pretrained(klass, path, *args, **kwargs):
            directory = Path(path)
            if not (directory / RANDOM_MARKER).is_file():
                return original(path, *args, **kwargs)
            import torch

            dtype = kwargs.get("torch_dtype") or kwargs.get("dtype") or torch.float32
            started = time.perf_counter()
            model = materialise(klass, directory, dtype, loader.device)
            loader.seconds += time.perf_counter() - started
            return model

        cls.from_pretrained = classmethod(from_pretrained)


def lora_state_dict(transformer, rank: int, seed: int, dtype, skip: str | None = None) -> dict:
    """A LoRA over every linear of the blocks in the trainer's diffusers/PEFT keys; B ~ N(0, 0.01)
    changes images without blowing activations up. `transformer` may live on the meta device."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        in_blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if not (in_blocks and isinstance(module, torch.nn.Linear)) or (skip and name.endswith(skip)):
            continue
        down = torch.randn(rank, module.in_features, generator=generator) * module.in_features**-0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.01
        state[f"transformer.{name}.lora_A.weight"] = down.to(dtype)
        state[f"transformer.{name}.lora_B.weight"] = up.to(dtype)
    return state


def write_loras(weights: Path, options: Options) -> None:
    """The Lassie LoRA, and the extras to serve; those wider than Lassie skip proj_mlp (partial LoRAs)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    config = FluxTransformer2DModel.load_config(weights / "flux-dev" / "transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    dtype = torch.float32 if options.dry_run else torch.bfloat16
    ranks = options.lora_ranks
    save_file(lora_state_dict(transformer, ranks["lassie"], seed=5, dtype=dtype),
              weights / "lassie" / "lora.safetensors")
    extras = weights / "bench-extras"
    extras.mkdir(exist_ok=True)
    for index, name in enumerate(("extra-a", "extra-b", "extra-wide")):
        skip = "proj_mlp" if ranks[name] > ranks["lassie"] else None
        save_file(lora_state_dict(transformer, ranks[name], seed=6 + index, dtype=dtype, skip=skip),
                  extras / f"{name}.safetensors")


# --- timing: per request and per phase -----------------------------------------------------------


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call: Callable[[], object]) -> tuple[float, object]:
    synchronize()
    started = time.perf_counter()
    result = call()
    synchronize()
    return time.perf_counter() - started, result


PHASES = ("text encoding", "denoising", "VAE decode", "to PIL", "image encoding", "rest")


class PhaseClock:
    """Seconds per phase of one request, from wrappers on the methods every FLUX call goes
    through (class attributes, so every pipeline view and model copy is timed). Denoising is the
    pipeline call less its text encoding, VAE decode and postprocessing; `rest` is the request
    less the pipeline call and image encoding (plan, adapters, files). Only phases timed inside
    the pipeline call count against it: lassie encodes prompts before calling the pipeline (its
    embedding cache), diffusers' own call encodes them inside."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.inside_pipeline = 0.0
        self._pipeline_calls = 0

    def install(self) -> None:
        from diffusers import AutoencoderKL, FluxPipeline
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        self.wrap(FluxPipeline, "__call__", "pipeline")
        self.wrap(FluxPipeline, "encode_prompt", "text encoding")
        self.wrap(AutoencoderKL, "decode", "VAE decode")
        self.wrap(VaeImageProcessor, "postprocess", "to PIL")
        self.wrap(Image.Image, "save", "image encoding")

    def wrap(self, owner: type, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)
        clock = self

        @functools.wraps(original)
        def timed_method(*args, **kwargs):
            synchronize()
            started = time.perf_counter()
            inside = clock._pipeline_calls > 0
            clock._pipeline_calls += phase == "pipeline"
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                clock._pipeline_calls -= phase == "pipeline"
                elapsed = time.perf_counter() - started
                clock.seconds[phase] += elapsed
                if inside and phase in ("text encoding", "VAE decode", "to PIL"):
                    clock.inside_pipeline += elapsed

        setattr(owner, attribute, timed_method)

    def reset(self) -> None:
        self.seconds.clear()
        self.inside_pipeline = 0.0

    def phases(self, total: float) -> dict[str, float]:
        measured = dict(self.seconds)
        pipeline = measured.pop("pipeline", 0.0)
        outside_pipeline = sum(measured.values()) - self.inside_pipeline  # image encoding, lassie's text encoding
        measured["denoising"] = max(pipeline - self.inside_pipeline, 0.0)
        measured["rest"] = max(total - pipeline - outside_pipeline, 0.0)
        return {name: measured.get(name, 0.0) for name in PHASES}


class TimedLogLines(logging.Handler):
    """The product's own "<step> took 1.2s" / "... in 3.4s" lines, in order, for the setup breakdown."""

    PATTERN = re.compile(r"^(?P<what>.+?) (?:took|in) (?P<seconds>\d+(?:\.\d+)?)s$")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: list[tuple[str, float]] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        match = self.PATTERN.match(message)
        if match:
            self.steps.append((match["what"], float(match["seconds"])))


class QuantizeClock:
    """Seconds spent in torchao's `quantize_`, wherever the caller imports it from at call time."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def install(self) -> None:
        try:
            import torchao.quantization as quantization
        except ImportError:
            return
        original = quantization.quantize_
        clock = self

        @functools.wraps(original)
        def quantize_(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                clock.seconds += time.perf_counter() - started

        quantization.quantize_ = quantize_


def compile_seconds() -> float | None:
    """torch.compile's own account of its time (dynamo + inductor) in this process so far."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return calculate_time_spent().get("total_wall_time", 0.0)
    except Exception:
        return None


def hardware() -> dict:
    import torch

    info = {"torch": torch.__version__}
    for module in ("diffusers", "torchao", "transformers", "peft"):
        info[module] = getattr(importlib.import_module(module), "__version__", "?")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(device=properties.name, memory_gib=round(properties.total_memory / GIB, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability())), cuda=torch.version.cuda)
    else:
        info.update(device=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return info


def memory_record(sink: Sink, label: str, cap: int | None = None) -> None:
    import torch

    if torch.cuda.is_available():
        sink.write("memory", label=label, allocated=torch.cuda.max_memory_allocated(),
                   reserved=torch.cuda.max_memory_reserved(), cap=cap)


# --- sections ----------------------------------------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Requests are the predictor's business; keep the log readable."""


def serve_extras(directory: Path) -> str:
    """Extra LoRAs over loopback HTTP, fetched like any `https://.../x.safetensors` address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def set_up_product(weights: Path, sink: Sink, label: str, clocks: Clocks):
    from lassie.predictor import Lassie
    from lassie.settings import Settings

    lines = TimedLogLines()
    product_log = logging.getLogger("lassie")
    product_log.addHandler(lines)
    compiled_before = compile_seconds()
    predictor = Lassie(replace(Settings.from_env(), weights_dir=weights))
    seconds, _ = timed(predictor.setup)
    product_log.removeHandler(lines)
    compiled = compile_seconds()
    sink.write("setup", label=label, total=seconds, materialise=clocks.loader.seconds,
               quantize=clocks.quantize.seconds,
               compile=None if compiled is None else compiled - (compiled_before or 0.0),
               warm_up=sum(s for what, s in lines.steps if what.startswith("warm-up")) if lines.steps else None,
               steps=lines.steps, plan=[line for line in lines.lines if "plan" in line or "go_fast:" in line][:3])
    log.info("%s: setup took %.1fs", label, seconds)
    product_log.setLevel(logging.WARNING)  # one line per request step would bury the progress log
    return predictor


def run_cases(predictor, cases: list[Case], options: Options, sink: Sink, clock: PhaseClock, base_url: str) -> None:
    """Round 0 warms up (and shows what a first request costs); rounds 1..repeats are timed.
    Cases interleave within a round, so drifting clocks hit all of them alike."""
    failed: set[str] = set()
    for round_index in range(options.repeats + 1):
        for case in cases:
            if case.name in failed:
                continue
            if options.out_of_time():
                sink.note(f"budget reached in round {round_index}; later runs skipped")
                return
            try:
                if case.previous_extra:
                    predictor.predict(case.request(options, round_index, base_url, case.previous_extra))
                clock.reset()
                seconds, _ = timed(lambda: predictor.predict(case.request(options, round_index, base_url)))
            except Exception as error:  # a refusal is a result to report, not a crash
                failed.add(case.name)
                sink.write("error", case=case.name, error=f"{type(error).__name__}: {error}"[:300])
                continue
            sink.write("run", case=case.name, model=case.model, warm=round_index == 0, seconds=seconds,
                       phases=clock.phases(seconds))
        log.info("round %d/%d done", round_index, options.repeats)


def image_psnr(reference, candidate) -> float:
    """PSNR in dB of two 8-bit images (arrays) of the same shape; infinite when they are identical."""
    import numpy as np

    if reference.shape != candidate.shape:
        raise ValueError(f"images differ in shape: {reference.shape} vs {candidate.shape}")
    error = np.mean((np.asarray(reference, dtype=np.float64) - np.asarray(candidate, dtype=np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def measure_psnr(predictor, options: Options, sink: Sink) -> None:
    """go_fast at lora_scale 1 runs the LoRA at 1.5; bf16 gets 1.5 directly: only precision differs."""
    import numpy as np
    from PIL import Image

    from lassie.request.plan import Request

    for model in ("schnell",) if options.quick else ("schnell", "dev"):
        if options.out_of_time():
            sink.note(f"budget reached before the {model} PSNR")
            return
        images = {}
        for go_fast, scale in ((True, 1.0), (False, 1.5)):
            request = Request(prompt=PROMPT, model=model, num_inference_steps=options.steps(model), aspect_ratio="1:1",
                              megapixels=options.megapixels, seed=SEED, go_fast=go_fast, lora_scale=scale,
                              output_format="png", disable_safety_checker=True)
            images[go_fast] = np.asarray(Image.open(predictor.predict(request)[0]).convert("RGB"))
        sink.write("psnr", model=model, db=image_psnr(images[True], images[False]))


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def random_traffic(predictor, options: Options, sink: Sink, base_url: str) -> None:
    """Requests as users send them after warm-up (scales, batches, sizes, models, go_fast, extras):
    the graphs they add (none expected), the requests served eagerly, and the first vs the tenth."""
    import random

    from torch._dynamo.utils import counters

    from lassie.request.plan import Request

    rng = random.Random(SEED)
    warnings = Warnings()
    logging.getLogger("lassie").addHandler(warnings)
    graphs_before, seconds = counters["stats"]["unique_graphs"], []
    count = TRAFFIC_REQUESTS_DRY_RUN if options.dry_run else TRAFFIC_REQUESTS_QUICK if options.quick else TRAFFIC_REQUESTS
    megapixels = ["0.25"] if options.dry_run else ["0.25", "1"]
    for index in range(count):
        if options.out_of_time():
            sink.note(f"budget reached after {index} random requests")
            break
        extra = rng.choice([None, "extra-a", "extra-b"])
        request = Request(prompt=PROMPT, model=rng.choice(["dev", "schnell"]), num_inference_steps=1,
                          aspect_ratio=rng.choice(["1:1", "16:9", "2:3", "21:9"]), megapixels=rng.choice(megapixels),
                          num_outputs=rng.randint(1, 4), seed=rng.randrange(2**32), go_fast=rng.random() < 0.7,
                          lora_scale=round(rng.uniform(-1, 3), 3), extra_lora_scale=round(rng.uniform(-1, 3), 3),
                          extra_lora=f"{base_url}/{extra}.safetensors" if extra else None, disable_safety_checker=True)
        took, _ = timed(lambda: predictor.predict(request))
        seconds.append(took)
    logging.getLogger("lassie").removeHandler(warnings)
    eager = sum("needs a graph warm-up did not compile" in message for message in warnings.messages)
    sink.write("traffic", requests=len(seconds), graphs=counters["stats"]["unique_graphs"] - graphs_before,
               eager=eager, first=seconds[0] if seconds else None, tenth=seconds[9] if len(seconds) > 9 else None)


def product_section(options: Options, sink: Sink, clocks: Clocks) -> None:
    weights = ensure_bench_weights(options)
    base_url = serve_extras(weights / "bench-extras")
    predictor = set_up_product(weights, sink, "product", clocks)
    memory_record(sink, "peak during setup")
    run_cases(predictor, chosen_cases(options), options, sink, clocks.phases, base_url)
    measure_psnr(predictor, options, sink)
    random_traffic(predictor, options, sink, base_url)
    memory_record(sink, "peak over setup and every request")


def warm_setup_section(options: Options, sink: Sink, clocks: Clocks) -> None:
    weights = ensure_bench_weights(options)
    predictor = set_up_product(weights, sink, "warm compile cache", clocks)
    first = Case("first dev go_fast request after a warm-cache setup", "dev", True)
    seconds, _ = timed(lambda: predictor.predict(first.request(options, 0, "")))
    sink.write("run", case=first.name, model="dev", warm=False, seconds=seconds, phases={})


class CappedProperties:
    """The real device properties, with total_memory as an 80 GB H100 reports it. The name stays:
    inductor's cache keys hold it, and the point is a setup with a warm compile cache."""

    def __init__(self, real, total_memory: int) -> None:
        self._real = real
        self.total_memory = total_memory

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def simulate_h100() -> None:
    """Cap the allocator at an H100's memory and report that size to whoever asks (the plan)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, H100_MEMORY / total))
    real_properties, real_mem_get_info = torch.cuda.get_device_properties, torch.cuda.mem_get_info

    def get_device_properties(device=None):
        return CappedProperties(real_properties(device), H100_MEMORY)

    def mem_get_info(device=None):
        free, _ = real_mem_get_info(device)
        return min(free, H100_MEMORY - torch.cuda.memory_reserved(device)), H100_MEMORY

    torch.cuda.get_device_properties = get_device_properties
    torch.cuda.mem_get_info = mem_get_info


H100_SEQUENCE = (
    Case("h100 plan: dev go_fast", "dev", True),
    Case("h100 plan: dev go_fast, again", "dev", True),
    Case("h100 plan: schnell go_fast (model switch)", "schnell", True),
    Case("h100 plan: schnell go_fast, again", "schnell", True),
    Case("h100 plan: dev go_fast (switch back)", "dev", True),
    Case("h100 plan: dev bf16", "dev", False),
)


def h100_section(options: Options, sink: Sink, clocks: Clocks) -> None:
    import torch

    weights = ensure_bench_weights(options)
    predictor = set_up_product(weights, sink, "h100 plan, warm compile cache", clocks)
    memory_record(sink, "h100 plan, peak during setup", cap=H100_MEMORY)
    for case in H100_SEQUENCE:
        if options.out_of_time():
            sink.note("budget reached; later h100 requests skipped")
            break
        try:
            seconds, _ = timed(lambda: predictor.predict(case.request(options, 0, "")))
        except torch.OutOfMemoryError as error:
            sink.write("error", case=case.name, error=f"out of memory under {H100_MEMORY / GIB:.1f} GiB: {error}"[:300])
            break
        sink.write("run", case=case.name, model=case.model, warm=False, seconds=seconds, phases={})
    if not options.out_of_time():
        worst_request(predictor, options, sink, serve_extras(weights / "bench-extras"))
    memory_record(sink, "h100 plan, peak over setup and requests", cap=H100_MEMORY)


def worst_request(predictor, options: Options, sink: Sink, base_url: str) -> None:
    """The largest request the schema allows, the one `lassie/engine/memory.py` plans for: 4 outputs at
    1440x1440 with an extra LoRA (1 step: memory, not time, is the point)."""
    import torch

    from lassie.request.plan import Request

    side = 512 if options.dry_run else 1440
    request = Request(prompt=PROMPT, model="dev", aspect_ratio="custom", width=side, height=side, num_outputs=4,
                      num_inference_steps=1, seed=SEED, extra_lora=f"{base_url}/extra-a.safetensors",
                      disable_safety_checker=True)
    name = f"worst request: dev, 4 x {side}x{side}, extra LoRA, 1 step"
    try:
        seconds, _ = timed(lambda: predictor.predict(request))
    except torch.OutOfMemoryError as error:
        sink.write("error", case=name, error=f"out of memory under {H100_MEMORY / GIB:.1f} GiB: {error}"[:300])
        return
    sink.write("run", case=name, model="dev", warm=False, seconds=seconds, phases={})


class Baselines:
    """Plain diffusers pipelines for dev and schnell over one set of shared components."""

    def __init__(self, weights: Path, device: str, dtype) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        self.weights, self.device, self.dtype = weights, device, dtype
        dev = FluxPipeline.from_pretrained(weights / "flux-dev", torch_dtype=dtype).to(device)
        self.components = {name: module for name, module in dev.components.items() if name != "transformer"}
        schnell_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(weights / "flux-schnell" / "scheduler")
        self.schedulers = {"dev": dev.scheduler, "schnell": schnell_scheduler}
        self.pipelines: dict = {}
        self.changed = False  # the transformers are no longer the bf16 weights as loaded
        self.use_transformers({"dev": dev.transformer, "schnell": self.load_transformer("schnell")})

    def load_transformer(self, model: str):
        from diffusers import FluxTransformer2DModel

        path = self.weights / f"flux-{model}" / "transformer"
        return FluxTransformer2DModel.from_pretrained(path, torch_dtype=self.dtype).to(self.device)

    def use_transformers(self, transformers: dict) -> None:
        from diffusers import FluxPipeline

        self.pipelines = {model: FluxPipeline(**{**self.components, "scheduler": self.schedulers[model],
                                                 "transformer": transformer})
                          for model, transformer in transformers.items()}
        for pipeline in self.pipelines.values():
            pipeline.set_progress_bar_config(disable=True)

    def prepare(self, recipe: str) -> None:
        """Each recipe starts from the bf16 weights: as loaded while nothing changed them, else
        loaded afresh. fp8 quantizes them in place (the published recipe); a bf16 + compile after
        it inherits torchao's inductor settings, as in BASELINE_RECIPES' order."""
        import gc

        import torch

        torch._dynamo.reset()
        if self.changed:
            self.pipelines = {}
            gc.collect()
            torch.cuda.empty_cache()
            self.use_transformers({model: self.load_transformer(model) for model in ("dev", "schnell")})
        self.changed = recipe != "bf16 eager"
        if recipe == "torchao fp8 + compile":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

            for pipeline in self.pipelines.values():
                quantize_(pipeline.transformer, Float8DynamicActivationFloat8WeightConfig())
        if recipe != "bf16 eager":
            for pipeline in self.pipelines.values():
                pipeline.transformer.compile_repeated_blocks(fullgraph=True)

    def call(self, model: str, options: Options, out: Path) -> None:
        """The product's call for a txt2img request (lassie.engine.generate), then its webp encoding."""
        import torch

        from lassie.request.outputs import save_images

        with torch.inference_mode():
            images = self.pipelines[model](PROMPT, width=options.size, height=options.size,
                                           num_inference_steps=options.steps(model), guidance_scale=3.0,
                                           max_sequence_length=MAX_SEQUENCE_LENGTH[model],
                                           generator=torch.Generator("cpu").manual_seed(SEED)).images
        save_images(images, "webp", 80, out)


MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}


def baselines_section(options: Options, sink: Sink, clocks: Clocks) -> None:
    """Plain diffusers: the published recipes on the same random weights, with the product's
    call arguments and encoding, and no LoRA."""
    import tempfile

    import torch

    weights = ensure_bench_weights(options)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    seconds, baselines = timed(lambda: Baselines(weights, device, dtype))
    sink.write("setup", label="diffusers pipelines", total=seconds, materialise=clocks.loader.seconds,
               quantize=None, compile=None, warm_up=None, steps=[], plan=[])
    out = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    for recipe in QUICK_BASELINE_RECIPES if options.quick else BASELINE_RECIPES:
        if recipe != "bf16 eager" and not cuda:
            sink.note(f"diffusers {recipe}: needs CUDA (dry run)")
            continue
        if options.out_of_time(margin=60):
            sink.note(f"diffusers {recipe}: budget reached; skipped")
            continue
        compiled_before, quantized_before = compile_seconds() or 0.0, clocks.quantize.seconds
        prepared, _ = timed(lambda: baselines.prepare(recipe))
        for round_index in range(options.repeats + 1):
            for model in baselines.pipelines:
                clocks.phases.reset()
                seconds, _ = timed(lambda: baselines.call(model, options, out))
                sink.write("run", case=f"diffusers {model} {recipe}", model=model, warm=round_index == 0,
                           seconds=seconds, phases=clocks.phases.phases(seconds))
        compiled = compile_seconds()
        if recipe != "bf16 eager":
            sink.write("setup", label=f"diffusers {recipe}", total=prepared, materialise=None,
                       quantize=clocks.quantize.seconds - quantized_before,
                       compile=None if compiled is None else compiled - compiled_before, warm_up=None, steps=[],
                       plan=[])
    memory_record(sink, "baselines, peak")


@dataclass
class Clocks:
    loader: RandomLoader
    phases: PhaseClock
    quantize: QuantizeClock


SECTION_RUNS: dict[str, Callable[[Options, Sink, Clocks], None]] = {
    "product": product_section,
    "baselines": baselines_section,
    "h100": h100_section,
    "warm-setup": warm_setup_section,
}


def run_section(name: str, options: Options, results: Path) -> None:
    """One section in this process; its records go to `results` as they are measured."""
    import torch

    sink = Sink(results, name)
    sink.write("hardware", **hardware())
    if name == "h100":
        simulate_h100()
    cuda = torch.cuda.is_available()
    clocks = Clocks(RandomLoader("cuda" if cuda else "cpu"), PhaseClock(), QuantizeClock())
    clocks.loader.install()
    clocks.phases.install()
    clocks.quantize.install()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        SECTION_RUNS[name](options, sink, clocks)
    except Exception as error:
        log.exception("section %s failed", name)
        sink.write("error", case=name, error=f"{type(error).__name__}: {error}"[:500])


# --- the parent: sections in child processes, within the budget -----------------------------------


def section_env(options: Options) -> dict[str, str]:
    """Offline, extras from loopback only, a fresh LoRA cache, one compile cache for all sections.
    A dry run's figures mean nothing: one CPU thread keeps it cheap on a busy shared machine
    (two OpenMP threads spin-waiting for cores other processes hold cost ten times as much)."""
    single_thread = {"OMP_NUM_THREADS": "1"} if options.dry_run else {}
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "LASSIE_ALLOW_PRIVATE_URLS": "127.0.0.1",
        "LASSIE_LORA_CACHE": str(options.work / "lora-cache"),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(options.work / "compile-cache")),
        "PYTHONUNBUFFERED": "1",
        **single_thread,
    }


def run_child(section: Section, options: Options, deadline: float | None, results: Path) -> None:
    """The section in a child process."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--section", section.name, "--results", str(results),
            "--work-dir", str(options.work), "--repeats", str(options.repeats)]
    argv += ["--quick"] * options.quick + ["--dry-run"] * options.dry_run
    if deadline is not None:
        argv += ["--deadline", f"{deadline:.3f}"]
    shutil.rmtree(options.work / "lora-cache", ignore_errors=True)
    started = time.perf_counter()
    child = subprocess.Popen(argv, env=section_env(options), cwd=REPO)
    try:
        child.wait(timeout=None if deadline is None else max(deadline - time.time(), 0) + KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        Sink(results, section.name).note(f"stopped at the budget after {time.perf_counter() - started:.0f} s")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode not in (0, -signal.SIGKILL):
        Sink(results, section.name).note(f"exited with status {child.returncode}")


def run_sections(sections: list[Section], options: Options, results: Path, after_each: Callable[[], object]) -> None:
    """`after_each` publishes the table so far: a run killed from outside still leaves its part."""
    for index, section in enumerate(sections):
        if section.needs_cuda and options.dry_run:
            Sink(results, section.name).note("skipped: needs CUDA (dry run)")
            continue
        last = index == len(sections) - 1
        deadline = None if options.deadline is None else options.deadline - (0 if last else section.reserve_s)
        if deadline is not None and deadline - time.time() < 30:
            Sink(results, section.name).note("skipped: budget spent")
            continue
        log.info("section %s (%s)", section.name, section.what)
        run_child(section, options, deadline, results)
        after_each()


# --- the table ---------------------------------------------------------------------------------


def seconds_text(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


@dataclass
class Timings:
    runs: list[float] = field(default_factory=list)
    first: float | None = None
    phases: list[dict[str, float]] = field(default_factory=list)
    model: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None


def collect_timings(records: list[dict]) -> dict[str, Timings]:
    timings: dict[str, Timings] = {}
    for record in records:
        if record["kind"] != "run":
            continue
        entry = timings.setdefault(record["case"], Timings(model=record["model"]))
        if record["warm"]:
            entry.first = record["seconds"]
        else:
            entry.runs.append(record["seconds"])
            if record["phases"]:
                entry.phases.append(record["phases"])
    return timings


def ratio_text(value: float | None, reference: Timings | None) -> str:
    if value is None or reference is None or not reference.median:
        return ""
    return f"{value / reference.median:.2f}x"


def verdict(case: Case | None, median: float | None, fp8: Timings | None) -> tuple[str, str]:
    if case is None or median is None or (case.target_s is None and case.target_ratio is None):
        return "", ""
    targets, passed = [], []
    if case.target_s is not None:
        targets.append(f"<= {case.target_s} s")
        passed.append(median <= case.target_s)
    if case.target_ratio is not None and fp8 is not None and fp8.median:
        targets.append(f"<= {case.target_ratio}x fp8 + compile")
        passed.append(median / fp8.median <= case.target_ratio)
    return "; ".join(targets), ("meets" if all(passed) else "misses")


def main_table(records: list[dict], timings: dict[str, Timings], judge: bool) -> list[str]:
    """`judge` is off for dry runs: tiny weights on a CPU say nothing about the targets."""
    cases = {case.name: case for case in CASES if judge}
    baseline = {(model, recipe): timings.get(f"diffusers {model} {recipe}")
                for model in ("dev", "schnell") for recipe in BASELINE_RECIPES}
    lines = ["| measurement | median | min-max | first run | x bf16 eager | x bf16 + compile | x fp8 + compile "
             "| target (H200) | verdict | published anchor (one H100) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in timings.items():
        runs = entry.runs
        spread = f"{min(runs):.3f}-{max(runs):.3f} s" if runs else ""
        references = [baseline.get((entry.model, recipe)) for recipe in ("bf16 eager", "bf16 + compile",
                                                                         "torchao fp8 + compile")]
        target, result = verdict(cases.get(name), entry.median, references[2])
        lines.append(f"| {name} | {seconds_text(entry.median)} | {spread} | {seconds_text(entry.first)} | "
                     + " | ".join(ratio_text(entry.median, reference) for reference in references)
                     + f" | {target} | {result} | {cases[name].anchor if name in cases else ''} |")
    switched, same = (timings.get(name) for name in SWITCH)
    if switched and same and switched.median is not None and same.median is not None:
        switch = switched.median - same.median
        result = ("meets" if switch <= SWITCH_TARGET_S else "misses") if judge else ""
        lines.append(f"| switch to a cached extra LoRA (switching - same) | {switch:.3f} s | | | | | | "
                     f"<= {SWITCH_TARGET_S} s | {result} | LoRA load in the reference predictor 1.2 s |")
    wide, narrow = (timings.get(name) for name in WIDE_SLOT)
    if wide and narrow and wide.median is not None and narrow.median:
        lines.append(f"| rank-64 vs rank-16 extra LoRA (schnell go_fast, the same slot) | "
                     f"{wide.median / narrow.median:.3f}x | | | | | | reported | | |")
    for record in records:
        if record["kind"] == "psnr":
            lines.append(f"| PSNR go_fast vs bf16 at 1.5x lora_scale, {record['model']} (random weights) | "
                         f"{record['db']:.1f} dB | | | | | | reported | | |")
        if record["kind"] == "traffic":
            first_tenth = (f"; first {record['first']:.2f} s, tenth {record['tenth']:.2f} s (1 step, mixed sizes)"
                           if record["tenth"] is not None else "")
            outcome = ("meets" if record["graphs"] == 0 and record["eager"] == 0 else "misses") if judge else ""
            lines.append(f"| {record['requests']} random requests after warm-up: graphs compiled / served eagerly | "
                         f"{record['graphs']} / {record['eager']}{first_tenth} | | | | | | 0 / 0 | {outcome} | |")
    return lines


def phase_table(timings: dict[str, Timings]) -> list[str]:
    lines = ["| measurement (medians) | " + " | ".join(PHASES) + " |", "| --- |" + " --- |" * len(PHASES)]
    for name, entry in timings.items():
        if entry.phases:
            medians = [statistics.median(phases.get(phase, 0.0) for phases in entry.phases) for phase in PHASES]
            lines.append(f"| {name} | " + " | ".join(f"{value:.3f} s" for value in medians) + " |")
    return lines


def setup_table(records: list[dict]) -> list[str]:
    lines = ["| setup | total | random weights materialised | quantize_ | torch.compile (dynamo + inductor) | "
             "warm-up (product log) | target |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for record in records:
        if record["kind"] != "setup":
            continue
        target = f"<= {WARM_SETUP_TARGET_S:.0f} s" if "warm compile cache" in record["label"] else ""
        lines.append(f"| {record['label']} | {seconds_text(record['total'], 1)} | "
                     f"{seconds_text(record['materialise'], 1)} | {seconds_text(record['quantize'], 1)} | "
                     f"{seconds_text(record['compile'], 1)} | {seconds_text(record['warm_up'], 1)} | {target} |")
    return lines


def memory_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in records:
        if record["kind"] == "memory":
            cap = f" (cap {record['cap'] / GIB:.1f} GiB)" if record["cap"] else ""
            lines.append(f"- GPU memory, {record['label']}{cap}: {record['allocated'] / GIB:.1f} GiB allocated, "
                         f"{record['reserved'] / GIB:.1f} GiB reserved")
    return lines


def header(records: list[dict], options: Options) -> str:
    info = next((record for record in records if record["kind"] == "hardware"), {})
    device = info.get("device", "unknown device")
    if "memory_gib" in info:
        device += f", {info['memory_gib']} GiB, compute capability {info['capability']}, CUDA {info['cuda']}"
    versions = ", ".join(f"{name} {info[name]}" for name in ("torch", "diffusers", "torchao", "transformers", "peft")
                         if name in info)
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("LASSIE_")) or "defaults"
    mode = ("dry run on CPU (tiny weights; figures mean nothing)" if options.dry_run
            else "full-size FLUX, random weights")
    return (f"{datetime.date.today().isoformat()}, {device}; {versions}; {mode}; "
            f"{'quick' if options.quick else 'full'}, {options.repeats} timed runs per case after one warm-up run; "
            f"settings: {knobs}")


def render(records: list[dict], options: Options) -> str:
    timings = collect_timings(records)
    parts = [header(records, options), "", *main_table(records, timings, judge=not options.dry_run), ""]
    parts += ["Phases (per request):", "", *phase_table(timings), "", *setup_table(records), ""]
    parts += memory_lines(records)
    for record in records:
        if record["kind"] == "setup" and record["plan"]:
            parts.append(f"- {record['label']} plan: " + " / ".join(record["plan"]))
        if record["kind"] == "setup" and record["steps"]:
            parts.append(f"- {record['label']} steps (product log): "
                         + "; ".join(f"{what} {seconds:.1f} s" for what, seconds in record["steps"]))
        if record["kind"] == "note":
            parts.append(f"- {record['section']}: {record['text']}")
        if record["kind"] == "error":
            parts.append(f"- {record['section']}: {record['case']} failed: {record['error']}")
    return "\n".join(parts)


# --- entry points --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"fewer runs, inside {QUICK_BUDGET_S} s by default")
    parser.add_argument("--dry-run", action="store_true", help="CPU path on tiny weights (no CUDA needed)")
    parser.add_argument("--repeats", type=int, help="timed rounds after the warm-up round (default 2 quick, 5 full)")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock budget (default {QUICK_BUDGET_S} with --quick)")
    parser.add_argument("--sections", help="comma-separated subset of " + ", ".join(s.name for s in SECTIONS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/lassie-bench"))
    parser.add_argument("--out", type=Path, help="also write the table (and .jsonl records) here; "
                        "default $OUT/bench_gpu.md when OUT is set")
    parser.add_argument("--print-wheels", action="store_true", help="print the pinned wheels to carry, and exit")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace, deadline: float | None) -> Options:
    repeats = args.repeats if args.repeats is not None else (1 if args.dry_run else 2 if args.quick else 5)
    return Options(quick=args.quick, dry_run=args.dry_run, repeats=repeats, work=args.work_dir, deadline=deadline)


def stop_on_sigterm(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.print_wheels:
        print("\n".join(wheel_pins()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.section:
        run_section(args.section, options_from(args, args.deadline), args.results)
        return
    budget = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if args.quick else None)
    started = time.time()
    preflight(args.dry_run)
    options = options_from(args, None if budget is None else started + budget)
    sections = chosen_sections(options, args.sections.split(",") if args.sections else None)
    print(describe_plan(options, sections), flush=True)
    options.work.mkdir(parents=True, exist_ok=True)
    results = options.work / "results.jsonl"
    results.unlink(missing_ok=True)
    out = args.out or (Path(os.environ["OUT"]) / "bench_gpu.md" if os.environ.get("OUT") else None)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run_sections(sections, options, results, after_each=lambda: publish(results, options, out))
    except KeyboardInterrupt:
        Sink(results, "bench").note("interrupted; the table holds what was measured until then")
    print(publish(results, options, out), flush=True)


def publish(results: Path, options: Options, out: Path | None) -> str:
    """The table from the records so far, written to `out` (and the records beside it)."""
    table = render(read_records(results), options)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        if results.is_file():
            shutil.copy(results, out.with_suffix(".jsonl"))
    return table


if __name__ == "__main__":
    main()
