#!/usr/bin/env bash
# Download the pinned wheels the GPU machine lacks into .whl/ (gitignored), for a machine
# without network: CPython 3.12, x86-64 Linux, no dependencies resolved (each one it lacks is
# named in the list). The list and versions come from scripts/bench_gpu.py --print-wheels
# (pyproject.toml's pins, plus those of the wheels' own needs). torch is never carried: the
# benchmark runs on the machine's own. Install there as docs/benchmarks.md says.
#
# Usage: bash scripts/carry_wheels.sh [--list]
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_MIB=60  # what travels to the device machine is capped at 64 MiB, the checkout included
mapfile -t WHEELS < <(python3 scripts/bench_gpu.py --print-wheels)
if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${WHEELS[@]}"
    exit 0
fi

rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

# What each wheel needs, for a check by eye against the machine's packages (docs/benchmarks.md).
python3 - <<'EOF'
import pathlib
import zipfile

for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        needs = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line]
    print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    print("           needs: " + (", ".join(needs) or "nothing"))
EOF

total_kib=$(du -sk .whl | cut -f1)
echo "total: $((total_kib / 1024)) MiB in .whl/"
if (( total_kib > MAX_MIB * 1024 )); then
    echo "over ${MAX_MIB} MiB: the device transfer limit (64 MiB with the checkout) would refuse it" >&2
    exit 1
fi
