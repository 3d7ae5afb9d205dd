"""Imported first by every script here: under a Python without the project's packages, one line, not a traceback.

`python scripts/make_tiny_weights.py` with a system Python would end in "No module named 'torch'";
what helps is the command to run instead: the project's own interpreter, `.venv/bin/python`, which
`bash scripts/setup.sh` creates. Standard library only, and importing it is the check (a call
between a script's imports would put the rest out of place), so it runs before any other import.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

VENV_PYTHON = ".venv/bin/python"
SETUP_COMMAND = "bash scripts/setup.sh"
MINIMUM_PYTHON = (3, 11)
# Import names of pyproject.toml's dependencies the scripts use: one missing means another environment.
PROJECT_PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "PIL", "yaml", "cog",
                    "httpx2")


def how_to_run() -> str:
    """The command that runs this same script, with its arguments, in the project's environment."""
    command = " ".join([VENV_PYTHON, f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return f"run `{SETUP_COMMAND}` (once), then `{command}`"


def problem() -> str | None:
    """Why this interpreter cannot run the project's scripts, or None."""
    if sys.version_info < MINIMUM_PYTHON:
        return f"Python {sys.version.split()[0]} is too old (3.11 or newer needed)"
    missing = [name for name in PROJECT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"{sys.executable} lacks the project's packages ({', '.join(missing)})"
    return None


_problem = problem()
if _problem is not None:
    sys.exit(f"error: {_problem}; {how_to_run()}")
