"""Compile-cache benchmark: a cold start against a restart that finds the cache beside the weights.

Each start is a new process running the product's own setup (predict.py's `Predictor.setup()`,
`LASSIE_COMPILE=1`, the inductor backend) on the tiny weights, with a fresh temporary directory and
no `TORCHINDUCTOR_CACHE_DIR`, as a restarted container has: what survives is only what lies in the
weights directory (inductor's caches in `compile-cache/` and the portable artifacts file saved
after warm-up). A third start keeps only the artifacts file, as another machine with the same GPU
and versions would receive it with the weights. Target: a restart warms up in at most half the
cold time. Inductor on CPU needs a C++ compiler (gcc).

Usage: python scripts/bench_compile_cache.py [--weights DIR] [--slot-rank 0] [--json]
       python scripts/bench_compile_cache.py --child   (one start; the parent runs these)
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import argparse
import datetime
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.5
WARM_UP_LINE = re.compile(r"warm-up compiled (\d+) graphs .* in ([\d.]+)s")
COUNTED = {"fxgraph_cache_hit": "inductor", "fxgraph_cache_miss": "inductor",
           "autograd_cache_hit": "aot_autograd", "autograd_cache_miss": "aot_autograd"}


def child() -> None:
    """One start of the product in this process, as Cog starts it (import predict.py, then its
    `setup`); prints one JSON line of what it compiled and reused."""
    sys.path.insert(0, str(REPO))

    import predict  # first, as Cog imports it: its imports are what rewrites TORCHINDUCTOR_CACHE_DIR

    messages: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("lassie").addHandler(Lines())
    from torch._dynamo.utils import counters

    predictor = predict.Predictor()
    started = time.perf_counter()
    predictor.setup()
    setup_s = time.perf_counter() - started
    warm_up = next((WARM_UP_LINE.search(line) for line in messages if WARM_UP_LINE.search(line)), None)
    record = {name: counters[group][name] for name, group in COUNTED.items()}
    record |= {"setup_s": round(setup_s, 2), "graphs": int(warm_up.group(1)) if warm_up else None,
               "warm_up_s": float(warm_up.group(2)) if warm_up else None,
               "cache_lines": [line for line in messages if line.startswith("compile cache")],
               "setting": str(predictor.lassie.settings.compile.cache_dir),
               "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    print(json.dumps(record), flush=True)


def start(weights: Path, extra_env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """One start in a new process with a fresh temporary directory; the product's settings from `extra_env`."""
    with tempfile.TemporaryDirectory(prefix="lassie-restart-") as fresh_tmp:
        env = {name: value for name, value in os.environ.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
        env |= {"TMPDIR": fresh_tmp, "LASSIE_WEIGHTS_DIR": str(weights), "LASSIE_COMPILE": "1",
                "LASSIE_COMPILE_BACKEND": "inductor", "OMP_WAIT_POLICY": "PASSIVE", **(extra_env or {})}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"setup failed ({done.returncode}):\n{done.stderr[-4000:]}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record["fxgraph_dirs_in_tmp"] = sorted(str(path) for path in Path(fresh_tmp).rglob("fxgraph"))
        return record


def keep_only_artifacts(cache: Path) -> None:
    """What another machine gets: the artifacts file alone, none of inductor's own cache folders."""
    for entry in cache.iterdir():
        if not entry.name.startswith("artifacts_"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help="a tiny weights directory to copy (default: build one)")
    parser.add_argument("--slot-rank", default="0",
                        help="LASSIE_LORA_SLOT_RANK for every start (default 0: the fewest graphs)")
    parser.add_argument("--json", action="store_true", help="print the raw records too")
    options = parser.parse_args()
    if options.child:
        child()
        return
    sys.path.insert(0, str(REPO / "scripts"))
    work = Path(tempfile.mkdtemp(prefix="lassie-bench-cache-"))
    weights = work / "weights"
    if options.weights:
        shutil.copytree(options.weights, weights, ignore=shutil.ignore_patterns("compile-cache"))
    else:
        import make_tiny_weights

        make_tiny_weights.build(weights)
    env = {"LASSIE_LORA_SLOT_RANK": options.slot_rank}
    runs = {"cold": start(weights, env), "restart": start(weights, env)}
    keep_only_artifacts(weights / "compile-cache")
    runs["artifacts only"] = start(weights, env)
    shutil.rmtree(work, ignore_errors=True)
    report(runs, env)
    if options.json:
        print(json.dumps(runs, indent=1))


def report(runs: dict[str, dict], env: dict[str, str]) -> None:
    cold = runs["cold"]["warm_up_s"]
    print(f"{datetime.date.today()} {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, settings {env}")
    print("| start | graphs | warm-up | vs cold | setup | FX graph cache hits/misses | AOTAutograd hits/misses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, run in runs.items():
        print(f"| {name} | {run['graphs']} | {run['warm_up_s']:.1f} s | {run['warm_up_s'] / cold:.2f}x | "
              f"{run['setup_s']:.1f} s | {run['fxgraph_cache_hit']}/{run['fxgraph_cache_miss']} | "
              f"{run['autograd_cache_hit']}/{run['autograd_cache_miss']} |")
    for name in ("restart", "artifacts only"):
        ratio = runs[name]["warm_up_s"] / cold
        print(f"{name}: {ratio:.2f}x the cold warm-up: {'meets' if ratio <= TARGET else 'misses'} "
              f"the target of at most {TARGET:g}x")


if __name__ == "__main__":
    main()
