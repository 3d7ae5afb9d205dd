"""CPU benchmark: lassie against a bare diffusers call, in-process and through the Cog HTTP server.

Every arm does the same work on the tiny weights: 512x512, 4 steps, the Lassie LoRA at 1.0, and
its image written in the same format with the same encoder settings (lassie.request.outputs). Arms run
interleaved round by round, so machine noise hits all alike (compare ratios from one run only).
Targets: in-process at most 1.10x the bare call, through the Cog HTTP server at most 1.25x. The
safety checker runs two more models the bare pipeline lacks: it is its own row, not overhead.

The server row is split where coglet shows it: each response's `metrics.predict_time` is the
worker's `predict()` as coglet times it, so "HTTP + coglet around predict()" is the request time
less that, and the worker's predict() can be set against the in-process predictor.

Every arm (this process and the server it starts) runs with OMP_WAIT_POLICY=PASSIVE unless
`--spin-wait`: with libgomp's default, a process whose torch work runs on one thread keeps its
OpenMP threads spinning between operations, and when other jobs want the CPU that made it 3-7x
slower here. The Cog worker runs each prediction on one of coglet's rotating threads; the extra
OpenMP teams put libgomp into its throttled (short) spin, so the server arm escaped it and the
ratios measured the neighbours' load, not lassie (docs/benchmarks.md).

Usage: python scripts/bench_cpu.py [--weights DIR] [--repeats N] [--format png|webp|jpg] [--no-server]
                                   [--spin-wait]
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IN_PROCESS_TARGET = 1.10
SERVER_TARGET = 1.25
PROMPT = "a photo of LSSIE the dog"
STEPS = 4
SEED = 1
BARE = "bare diffusers FluxPipeline + encoding"
IN_PROCESS = "lassie predictor, in-process"
SERVER = "lassie through the Cog HTTP server"
CHECKED = "lassie predictor + safety checker"


def tiny_weights(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    import make_tiny_weights  # scripts/ is on sys.path when this script runs

    out = Path(tempfile.mkdtemp(prefix="lassie-bench-"))
    make_tiny_weights.build(out)
    return out


def bare_call(weights: Path, output_format: str) -> Callable[[], None]:
    """What a diffusers user writes for the same image: the Lassie LoRA at 1.0, one call, one file."""
    import torch
    from diffusers import FluxPipeline

    from lassie.request.outputs import save_images

    pipe = FluxPipeline.from_pretrained(weights / "flux-dev")
    pipe.load_lora_weights(str(weights / "lassie" / "lora.safetensors"), adapter_name="lassie")
    pipe.set_adapters("lassie", 1.0)
    pipe.set_progress_bar_config(disable=True)
    out = Path(tempfile.mkdtemp(prefix="lassie-bench-bare-"))

    def run() -> None:
        with torch.inference_mode():
            images = pipe(PROMPT, width=512, height=512, num_inference_steps=STEPS, guidance_scale=3.0,
                          generator=torch.Generator("cpu").manual_seed(SEED)).images
        save_images(images, output_format, 80, out)

    return run


class ServerArm:
    """POST /predictions to a real coglet server on 127.0.0.1; keeps coglet's predict_time too."""

    def __init__(self, weights: Path, inputs: dict) -> None:
        from cog_server import CogServer  # scripts/ is on sys.path when this script runs

        self.server = CogServer(weights)
        self.inputs = inputs
        self.predict_times: list[float] = []

    def __enter__(self) -> ServerArm:
        health = self.server.start()
        if health.get("status") != "READY":
            self.server.stop()
            raise SystemExit(f"cog server setup failed: {health}; see {self.server.log_path}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()

    def __call__(self) -> None:
        status, body = self.server.predict(self.inputs)
        if status != 200 or body.get("status") != "succeeded":
            raise SystemExit(f"server prediction failed ({status}): {body.get('error')}")
        self.predict_times.append(body["metrics"]["predict_time"])


def interleaved(calls: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """One warm-up call each, then `repeats` rounds of one call each."""
    for call in calls.values():
        call()
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - started)
    return timings


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(medians: dict[str, float], server: ServerArm | None, args: argparse.Namespace, threads: int) -> str:
    bare = medians[BARE]
    policy = os.environ.get("OMP_WAIT_POLICY", "libgomp default")
    lines = [f"tiny weights, 512x512, {STEPS} steps, {args.repeats} repeats, output {args.format}, "
             f"{threads} threads, OMP_WAIT_POLICY {policy}, {cpu_name()}"]
    targets = {IN_PROCESS: IN_PROCESS_TARGET, SERVER: SERVER_TARGET}
    for name, median in medians.items():
        line = f"  {name:40s} median {median * 1000:8.1f} ms"
        if name in targets:
            ratio = median / bare
            verdict = "meets" if ratio <= targets[name] else "misses"
            line += f"   {ratio:.3f}x the bare call ({verdict} the {targets[name]:.2f}x target)"
        lines.append(line)
        if name == SERVER and server is not None:
            predict_time = statistics.median(server.predict_times[1:])
            lines.append(f"    {'HTTP + coglet around predict()':38s} {(median - predict_time) * 1000:8.1f} ms")
            lines.append(f"    {'worker predict() (coglet predict_time)':38s} {predict_time * 1000:8.1f} ms   "
                         f"{predict_time / medians[IN_PROCESS]:.3f}x in-process")
    row = [datetime.date.today().isoformat(), f"{cpu_name()}, {threads} threads", f"{bare * 1000:.1f} ms",
           f"{medians[IN_PROCESS] * 1000:.1f} ms ({medians[IN_PROCESS] / bare:.3f}x)"]
    if SERVER in medians:
        row.append(f"{medians[SERVER] * 1000:.1f} ms ({medians[SERVER] / bare:.3f}x)")
    lines.append("markdown row: | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--format", default="png", choices=["webp", "jpg", "png"])
    parser.add_argument("--no-server", action="store_true", help="skip the Cog HTTP server arm")
    parser.add_argument("--spin-wait", action="store_true", help="keep libgomp's default wait policy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.spin_wait:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads libgomp: before the import below

    import torch
    from diffusers.utils import logging as diffusers_logging

    from lassie.predictor import Lassie
    from lassie.request.plan import Request
    from lassie.settings import Settings

    diffusers_logging.disable_progress_bar()
    weights = tiny_weights(args.weights)
    inputs = dict(prompt=PROMPT, megapixels="0.25", num_inference_steps=STEPS, seed=SEED, output_format=args.format,
                  disable_safety_checker=True)
    predictor = Lassie(replace(Settings.from_env(), weights_dir=weights))
    predictor.setup()
    request = Request(**inputs)
    checked = Request(**{**inputs, "disable_safety_checker": False})
    calls = {
        BARE: bare_call(weights, args.format),
        IN_PROCESS: lambda: predictor.predict(request),
        CHECKED: lambda: predictor.predict(checked),
    }
    if args.no_server:
        medians = {name: statistics.median(values) for name, values in interleaved(calls, args.repeats).items()}
        print(report(medians, None, args, torch.get_num_threads()))
        return
    with ServerArm(weights, inputs) as server:
        calls = {BARE: calls[BARE], IN_PROCESS: calls[IN_PROCESS], SERVER: server, CHECKED: calls[CHECKED]}
        medians = {name: statistics.median(values) for name, values in interleaved(calls, args.repeats).items()}
        print(report(medians, server, args, torch.get_num_threads()))


if __name__ == "__main__":
    main()
