"""Fetching a weights tar: parallel ranges against one stream, side by side, on a loopback host.

The host (`range_server.py`) caps each connection's speed, as a real weights host's per-connection
throughput is capped; one stream then takes size / cap, and parallel ranges take a fraction of it.
Both arms run the product's own path (`lassie.weights.downloads.fetch_folder`: fetch, extract while it
arrives, rename into place), alternating, and the medians are compared. pget is left out
(`use_pget=False`), so the figures are the project's own client's.

    python scripts/bench_download.py [--megabytes 200] [--cap-mb-per-s 20] [--connections 16] [--rounds 3]
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import argparse
import io
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lassie.weights.downloads import FetchOptions, fetch_folder
from range_server import RangeServer

MB = 1000**2


def weights_tar(total_bytes: int, files: int = 4) -> bytes:
    """Incompressible files, like model weights, under one top-level folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(files):
            data = os.urandom(total_bytes // files)
            info = tarfile.TarInfo(f"model/part-{index}.safetensors")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def timed_fetch(url: str, options: FetchOptions, expected_files: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-download-") as root:
        started = time.perf_counter()
        fetch_folder(url, Path(root) / "folder", lambda folder: [], options)
        elapsed = time.perf_counter() - started
        assert len(list((Path(root) / "folder").iterdir())) == expected_files
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--cap-mb-per-s", type=float, default=20.0, help="each connection's speed cap")
    parser.add_argument("--connections", type=int, default=FetchOptions.connections)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = weights_tar(args.megabytes * MB)
    arms = {
        "one stream": FetchOptions(connections=1, use_pget=False),
        f"{args.connections} parallel ranges": FetchOptions(connections=args.connections, use_pget=False),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    with RangeServer(bytes_per_second=args.cap_mb_per_s * MB) as host:
        url = host.serve("/weights.tar", data)
        for _ in range(args.rounds):
            for name, options in arms.items():
                times[name].append(timed_fetch(url, options, expected_files=4))
    single, parallel = (statistics.median(values) for values in times.values())
    size = len(data) / MB
    print(f"{size:.0f} MB tar, each connection capped at {args.cap_mb_per_s:.0f} MB/s, median of {args.rounds}, "
          f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:>24}: {median:6.2f} s ({size / median:6.1f} MB/s)  runs: "
              + ", ".join(f"{value:.2f}" for value in values))
    print(f"  parallel ranges are {single / parallel:.1f}x faster than one stream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
