"""Every script run by a Python without the project's packages says, in one line, what to run instead.

`-S -E`: this interpreter without its site-packages (and without PYTHON* variables) stands in for
a system `python3` that lacks torch, cog and the rest. (`-I` would also drop the script's own
folder from `sys.path`, which no `python scripts/x.py` does.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

# bench_gpu.py runs on GPU machines whose Python may lack the packages on purpose: its own
# preflight prints how to install them (or carry their wheels) and exits with status 2.
OWN_PREFLIGHT = {"bench_gpu.py"}
SCRIPTS = sorted(path.name for path in (REPO / "scripts").glob("*.py")
                 if 'if __name__ == "__main__":' in path.read_text() and path.name not in OWN_PREFLIGHT)


def test_every_runnable_script_is_covered():
    assert {"demo.py", "download_weights.py", "make_tiny_weights.py", "write_openapi_schema.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_python_without_the_project_s_packages_gets_one_line_naming_the_venv(script, tmp_path):
    done = subprocess.run([sys.executable, "-S", "-E", str(REPO / "scripts" / script), "some-argument"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "lacks the project's packages (torch" in done.stderr
    assert f"`bash scripts/setup.sh` (once), then `.venv/bin/python scripts/{script} some-argument`" in done.stderr


def test_building_the_tiny_weights_is_as_quiet_as_setup(tmp_path):
    """No library warnings (lassie.quiet's known noise) and no progress bars: only the script's own line."""
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_weights.py"), str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (done.stdout + done.stderr).splitlines() == [f"tiny weights written to {out}"]


def test_the_demo_s_build_of_the_tiny_weights_draws_no_progress_bar(tmp_path):
    """The demo calls `build` itself, without the script's `main`: the bars stay off there too."""
    out = tmp_path / "tiny"
    code = f"from pathlib import Path; from make_tiny_weights import build; build(Path({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "scripts", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout + done.stderr and "Writing model shards" not in done.stderr
