"""Full-size GPU benchmark: FLUX.1 dev and schnell at their real size, through the predictor.

Real weights cannot be fetched where this runs, so it builds both architectures from the public
configs in lassie/flux_configs with random weights (on the meta device, then allocated and
filled on the GPU) and writes them in the real weights layout, RAM-backed under /dev/shm when
there is room; a later run reuses them. Then it times `lassie.predictor.Lassie` side by side in
one process, each case's median after a warm-up run:

- dev 1024x1024, 28 steps, bf16 vs go_fast; schnell 1024x1024, 4 steps, bf16 vs go_fast;
  both with the Lassie adapter active (it always is);
- switching to another, already cached extra LoRA (served from a loopback HTTP server):
  median of alternating two extras minus median of repeating one, schnell go_fast;
- setup time and peak GPU memory; PSNR of go_fast against bf16 for the same seed, with the
  bf16 run given the 1.5x LoRA scale go_fast applies, so only the precision differs.

It prints a markdown table with the targets, the published H100 anchors and the compute floor
(docs/benchmarks.md keeps the results). Random weights make the timings real and the PSNR only
a smoke check (finite, similar images), not a quality verdict. Safety checking is off: the
safety models are the tiny ones.

Usage: python scripts/bench_gpu.py [--weights-dir DIR] [--repeats N] [--rebuild]
Exits with status 2, running nothing, where no CUDA GPU is available.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lassie.quantization import image_psnr, plan_go_fast, query_device  # noqa: E402
from lassie.request import GO_FAST_LORA_MULTIPLIER  # noqa: E402

log = logging.getLogger("bench_gpu")

CONFIGS = REPO / "lassie" / "flux_configs"
NO_GPU_EXIT = 2
GIB = 2**30
WEIGHTS_BYTES = 60 * 10**9
SHM_DIR = Path("/dev/shm/lassie-bench-weights")
DISK_DIR = Path("/tmp/lassie-bench-weights")
MARKER = "bench-weights.json"
EXTRA_DIR = "bench-extra"
LASSIE_RANK = 16
EXTRA_RANKS = {"extra-a": 16, "extra-b": 32}
PROMPT = "a photo of LSSIE the dog on a beach"
SEED = 1234


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    steps: int
    go_fast: bool
    target_s: float | None
    anchor: str
    floor: str


CASES = (
    Case("dev 1024x1024, 28 steps, bf16", "dev", 28, False, 3.5,
         "diffusers bf16 eager 6.6-6.9 s; + torch.compile 4.2-4.5 s", "2.64 s (bf16)"),
    Case("dev 1024x1024, 28 steps, go_fast", "dev", 28, True, 2.0,
         "torchao fp8 + compile 3.0-3.2 s; Replicate go_fast 3.03 s", "1.32 s (fp8)"),
    Case("schnell 1024x1024, 4 steps, bf16", "schnell", 4, False, None, "", "0.38 s (bf16)"),
    Case("schnell 1024x1024, 4 steps, go_fast", "schnell", 4, True, 0.35, "Replicate go_fast 0.72 s", "0.19 s (fp8)"),
)
SWITCH_TARGET_S = 0.5


@dataclass
class Results:
    setup_s: float = 0.0
    runs: dict[str, list[float]] = field(default_factory=dict)
    switch_s: float | None = None
    switch_note: str = ""
    psnr_db: dict[str, float] = field(default_factory=dict)
    peak_allocated: int = 0
    peak_reserved: int = 0


def require_cuda() -> None:
    if not torch.cuda.is_available():
        log.error("bench_gpu.py needs a CUDA GPU, and torch sees none on this machine (torch %s); "
                  "nothing was run. Run it where a GPU is lent: see docs/benchmarks.md.", torch.__version__)
        raise SystemExit(NO_GPU_EXIT)


def load_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def configs_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(CONFIGS.glob("*.json")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tiny_builder():
    """scripts/make_tiny_weights.py: its tokenizers and safety models are reused as they are."""
    import make_tiny_weights  # scripts/ is on sys.path when this script runs

    return make_tiny_weights


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled normal weights, zero biases, unit norm scales: activations stay O(1) in bf16."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, parameter in module.named_parameters():
        if parameter.ndim >= 2:
            parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)


def random_on_gpu(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Built on the meta device, so the only allocation is the bf16 one on the GPU. `to_empty`
    unties shared weights (T5's input embeddings): tie them again as the real checkpoint has them."""
    with torch.device("meta"):
        module = build().to(torch.bfloat16)
    module = module.to_empty(device="cuda")
    fill_random_(module, seed)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval()


def flux_transformer(config_name: str, seed: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return random_on_gpu(lambda: FluxTransformer2DModel.from_config(load_config(config_name)), seed)


def lora_state_dict(transformer: torch.nn.Module, rank: int, seed: int, skip: str | None = None) -> dict:
    """A LoRA over every linear of the blocks in the trainer's diffusers/PEFT keys, small enough
    (B ~ N(0, 0.01)) to change images without blowing activations up."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        in_blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if not (in_blocks and isinstance(module, torch.nn.Linear)) or (skip and name.endswith(skip)):
            continue
        down = torch.randn(rank, module.in_features, generator=generator) * module.in_features**-0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.01
        state[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
        state[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    return state


def write_dev(layout, tiny) -> torch.nn.Module:
    """flux-dev: the full pipeline (transformer, VAE, CLIP-L, T5-XXL, tiny tokenizers)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizers = layout.root / "tmp-tokenizers"
    torch.manual_seed(3)
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(load_config("dev_scheduler")),
        vae=AutoencoderKL.from_config(load_config("vae")).to(torch.bfloat16),
        text_encoder=CLIPTextModel(CLIPTextConfig(**load_config("clip_text_encoder"))).to(torch.bfloat16),
        tokenizer=tiny.write_clip_tokenizer(tokenizers / "clip"),
        text_encoder_2=random_on_gpu(lambda: T5EncoderModel(T5Config(**load_config("t5_text_encoder"))), seed=4),
        tokenizer_2=tiny.write_t5_tokenizer(tokenizers / "t5"),
        transformer=flux_transformer("dev_transformer", seed=0),
    )
    pipeline.save_pretrained(layout.dev_dir)
    shutil.rmtree(tokenizers)
    return pipeline.transformer


def write_schnell(layout) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux_transformer("schnell_transformer", seed=1).save_pretrained(layout.schnell_dir / "transformer")
    FlowMatchEulerDiscreteScheduler.from_config(load_config("schnell_scheduler")).save_pretrained(
        layout.schnell_dir / "scheduler")
    shutil.copy(layout.dev_dir / "model_index.json", layout.schnell_dir / "model_index.json")


def write_loras(layout, transformer: torch.nn.Module, tiny) -> None:
    """The Lassie LoRA, and two extras: rank 32 and partial (no proj_mlp) to exercise hotswap."""
    from safetensors.torch import save_file

    layout.lassie_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(transformer, LASSIE_RANK, seed=5), layout.lassie_lora)
    layout.trigger_word_file.write_text(tiny.TRIGGER_WORD + "\n")
    (layout.root / EXTRA_DIR).mkdir(exist_ok=True)
    for index, (name, rank) in enumerate(EXTRA_RANKS.items()):
        skip = "proj_mlp" if rank > LASSIE_RANK else None
        save_file(lora_state_dict(transformer, rank, seed=6 + index, skip=skip),
                  layout.root / EXTRA_DIR / f"{name}.safetensors")


def build_weights(out: Path) -> None:
    from lassie.weights import WeightsLayout

    tiny = tiny_builder()
    layout = WeightsLayout(out)
    started = time.perf_counter()
    dev_transformer = write_dev(layout, tiny)
    write_loras(layout, dev_transformer, tiny)
    del dev_transformer
    torch.cuda.empty_cache()
    write_schnell(layout)
    tiny.write_safety_models(layout)
    (out / MARKER).write_text(json.dumps({"configs": configs_digest()}))
    log.info("full-size random weights written to %s in %.0fs", out, time.perf_counter() - started)


def default_weights_dir() -> Path:
    room = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else 0
    return SHM_DIR if SHM_DIR.is_dir() or room >= WEIGHTS_BYTES else DISK_DIR


def ensure_weights(out: Path, rebuild: bool) -> Path:
    marker = out / MARKER
    current = marker.is_file() and json.loads(marker.read_text()).get("configs") == configs_digest()
    if current and not rebuild:
        log.info("reusing the full-size random weights in %s", out)
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    build_weights(out)
    return out


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Requests are the predictor's business; keep the table readable."""


def serve(directory: Path) -> str:
    """Extra LoRAs over loopback HTTP, fetched like any `https://.../x.safetensors` address."""
    from lassie.download import ALLOW_PRIVATE_ENV

    os.environ[ALLOW_PRIVATE_ENV] = "1"
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def request(model: str, steps: int, go_fast: bool, **fields):
    from lassie.request import Request

    return Request(prompt=PROMPT, model=model, num_inference_steps=steps, aspect_ratio="1:1", megapixels="1",
                   seed=SEED, go_fast=go_fast, disable_safety_checker=True, **fields)


def seconds(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def time_cases(predictor, repeats: int, results: Results) -> None:
    """bf16 and go_fast interleaved per model, so drifting clocks hit both alike."""
    calls = {case.name: partial(predictor.predict, request(case.model, case.steps, case.go_fast))
             for case in CASES}
    for name, call in calls.items():
        log.info("warm-up run: %s", name)
        call()
        results.runs[name] = []
    for repeat in range(repeats):
        for name, call in calls.items():
            results.runs[name].append(seconds(call))
        log.info("repeat %d/%d done", repeat + 1, repeats)


def time_extra_switch(predictor, base_url: str, repeats: int, results: Results) -> None:
    """Median of alternating two cached extras minus median of repeating one (schnell go_fast)."""
    urls = [f"{base_url}/{name}.safetensors" for name in EXTRA_RANKS]
    runs = {url: partial(predictor.predict, request("schnell", 4, True, extra_lora=url)) for url in urls}
    try:
        for call in runs.values():
            call()
    except Exception as error:  # the predictor's refusal is a result to report, not a crash
        results.switch_note = f"n/a: {error}"
        return
    first = runs[urls[0]]
    same = [seconds(first) for _ in range(repeats)]
    alternating = [seconds(runs[urls[i % 2]]) for i in range(1, 2 * repeats + 1)]
    results.switch_s = statistics.median(alternating) - statistics.median(same)
    results.switch_note = f"alternating {statistics.median(alternating):.3f} s - same {statistics.median(same):.3f} s"


def pixels(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(paths[0]).convert("RGB"))


def measure_psnr(predictor, results: Results) -> None:
    """go_fast at lora_scale 1 runs the LoRA at 1.5; bf16 gets 1.5 directly: only precision differs."""
    for model, steps in (("dev", 28), ("schnell", 4)):
        fast = pixels(predictor.predict(request(model, steps, True, lora_scale=1.0, output_format="png")))
        exact = pixels(predictor.predict(request(model, steps, False, lora_scale=GO_FAST_LORA_MULTIPLIER,
                                                 output_format="png")))
        results.psnr_db[model] = image_psnr(exact, fast)


def run(weights: Path, repeats: int) -> Results:
    from lassie.predictor import Lassie

    results = Results()
    base_url = serve(weights / EXTRA_DIR)
    torch.cuda.reset_peak_memory_stats()
    predictor = Lassie(weights)
    results.setup_s = seconds(predictor.setup)
    log.info("setup took %.1fs", results.setup_s)
    time_cases(predictor, repeats, results)
    time_extra_switch(predictor, base_url, repeats, results)
    measure_psnr(predictor, results)
    results.peak_allocated = torch.cuda.max_memory_allocated()
    results.peak_reserved = torch.cuda.max_memory_reserved()
    return results


def verdict(value: float | None, target: float | None) -> str:
    if value is None or target is None:
        return ""
    return "meets" if value <= target else "misses"


def table(results: Results, repeats: int) -> str:
    device = query_device()
    lines = [
        f"{datetime.date.today().isoformat()}, {device.describe()}, {device.total_memory / GIB:.0f} GiB; "
        f"torch {torch.__version__}; {repeats} timed runs per case after one warm-up run",
        f"{plan_go_fast(device).reason}",
        "",
        "| measurement | median | min-max | target (H200) | verdict | published anchor (H100) | compute floor |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        runs = results.runs[case.name]
        median = statistics.median(runs)
        target = f"<= {case.target_s} s" if case.target_s else ""
        lines.append(f"| {case.name} | {median:.3f} s | {min(runs):.3f}-{max(runs):.3f} s | {target} | "
                     f"{verdict(median, case.target_s)} | {case.anchor} | {case.floor} |")
    switch = f"{results.switch_s:.3f} s" if results.switch_s is not None else "n/a"
    lines.append(f"| switch to a cached extra LoRA | {switch} | {results.switch_note} | <= {SWITCH_TARGET_S} s | "
                 f"{verdict(results.switch_s, SWITCH_TARGET_S)} | reference LoRA load 1.2 s | |")
    lines.append(f"| setup (load, quantize, compile, warm-up) | {results.setup_s:.1f} s | | | | | |")
    lines.append(f"| peak GPU memory | {results.peak_allocated / GIB:.1f} GiB allocated | "
                 f"{results.peak_reserved / GIB:.1f} GiB reserved | fits 80 GiB (H100) | "
                 f"{verdict(results.peak_reserved / GIB, 79.0)} | bf16 pipeline peak 34-36 GB | |")
    for model, psnr in results.psnr_db.items():
        lines.append(f"| PSNR go_fast vs bf16, {model} (random weights) | {psnr:.1f} dB | | reported | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, help=f"default {SHM_DIR} (RAM) if it has room, else {DISK_DIR}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the random weights even if present")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    require_cuda()
    weights = ensure_weights(args.weights_dir or default_weights_dir(), args.rebuild)
    results = run(weights, args.repeats)
    print(table(results, args.repeats))


if __name__ == "__main__":
    main()
