#!/usr/bin/env bash
# The main job: set up, then serve one prediction through the Cog HTTP server and show it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
