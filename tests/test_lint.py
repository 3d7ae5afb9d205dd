"""The project lints clean under its own rule set (pyproject.toml's [tool.ruff.lint]) with the pinned ruff.

cog-safe-push's first step is `ruff check predict.py --ignore=E402`, run in the model's directory with the
ruff it installs (0.17.6 today): the first test runs exactly that. The second holds the whole project to
the same rules.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO


def ruff_command() -> list[str]:
    """The ruff installed beside this Python (the test extra's pin), else the module it came with."""
    beside = Path(sys.executable).parent / "ruff"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ruff"]


def ruff(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ruff_command(), *arguments], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_ruff_here_is_the_pinned_one() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    [pin] = [spec for spec in pyproject["project"]["optional-dependencies"]["test"] if spec.startswith("ruff==")]
    assert ruff("--version").stdout.split() == ["ruff", pin.removeprefix("ruff==")]


def test_cog_safe_push_lint_step_passes() -> None:
    result = ruff("check", "predict.py", "--ignore=E402")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_whole_project_is_clean_under_its_rule_set() -> None:
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
