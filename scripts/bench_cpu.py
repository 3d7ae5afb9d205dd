"""CPU benchmark: the predictor against a bare diffusers FluxPipeline call, side by side.

Both run the same work on the tiny weights (512x512, 4 steps, the Lassie LoRA at scale 1),
interleaved so that machine noise hits both alike; the predictor's time includes reading
the request, setting adapters and encoding the file. Prints medians and their ratio.
Target: predictor <= 1.10x the bare pipeline. The safety checker runs two more models, which
the bare pipeline does not: it is timed as a separate row, not counted as overhead.

Usage: python scripts/bench_cpu.py [--weights DIR] [--repeats N] [--format webp|jpg|png]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_RATIO = 1.10
PROMPT = "a photo of LSSIE the dog"


def tiny_weights(directory: Path | None) -> Path:
    if directory is not None:
        return directory
    import make_tiny_weights  # scripts/ is on sys.path when this script runs

    out = Path(tempfile.mkdtemp(prefix="lassie-bench-"))
    make_tiny_weights.build(out)
    return out


def bare_pipeline(weights: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(weights / "flux-dev")
    pipe.load_lora_weights(str(weights / "lassie" / "lora.safetensors"), adapter_name="lassie")
    pipe.set_adapters("lassie", 1.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--format", default="webp", choices=["webp", "jpg", "png"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from diffusers.utils import logging as diffusers_logging

    from lassie.predictor import Lassie
    from lassie.request import Request

    diffusers_logging.disable_progress_bar()
    weights = tiny_weights(args.weights)
    predictor = Lassie(weights)
    predictor.setup()
    pipe = bare_pipeline(weights)
    request = Request(prompt=PROMPT, megapixels="0.25", num_inference_steps=4, seed=1, output_format=args.format,
                      disable_safety_checker=True)
    checked = Request(**{**request.__dict__, "disable_safety_checker": False})

    def run_bare() -> None:
        with torch.inference_mode():
            pipe(PROMPT, width=512, height=512, num_inference_steps=4, guidance_scale=3.0,
                 generator=torch.Generator("cpu").manual_seed(1)).images

    calls = {
        "bare diffusers FluxPipeline": run_bare,
        "lassie predictor": lambda: predictor.predict(request),
        "lassie predictor + safety checker": lambda: predictor.predict(checked),
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for name, call in calls.items():
        call()
    for _ in range(args.repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - started)

    medians = {name: statistics.median(values) for name, values in timings.items()}
    ratio = medians["lassie predictor"] / medians["bare diffusers FluxPipeline"]
    print(f"tiny weights, 512x512, 4 steps, {args.repeats} repeats, output {args.format}, "
          f"{torch.get_num_threads()} threads")
    for name, median in medians.items():
        print(f"  {name:34s} median {median * 1000:8.1f} ms")
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"  ratio predictor / bare: {ratio:.3f} ({verdict} the {TARGET_RATIO:.2f}x target)")


if __name__ == "__main__":
    main()
