"""The four packages keep to what their docstrings allow: `request`, `fetch` and `weights` import
no torch (requests are checked and LoRAs and weights fetched before any model is loaded), and each
imports only the parts of lassie it may."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

from conftest import REPO

# Each package's modules, imported one after another in a fresh interpreter: after each import,
# torch must still be absent and every lassie module loaded so far must be one the package may use
# (or a package above one: their `__init__` is a docstring).
CHECK = """
import importlib, json, pkgutil, sys
package, allowed = sys.argv[1], tuple(sys.argv[2:])
root = importlib.import_module(package)
names = [package] + sorted(m.name for m in pkgutil.walk_packages(root.__path__, package + "."))
problems = []
for name in names:
    importlib.import_module(name)
    if "torch" in sys.modules:
        problems.append(f"{name} imports torch")
        break
    strays = sorted(m for m in sys.modules if m.startswith("lassie.") and not any(
        m == a or m.startswith(a + ".") or a.startswith(m + ".") for a in allowed))  # a's parents: bare packages
    if strays:
        problems.append(f"{name} imports {strays}")
        break
print(json.dumps({"modules": names, "problems": problems}))
"""

RULES = {
    "lassie.request": ("lassie.request",),
    "lassie.fetch": ("lassie.fetch", "lassie.request.errors", "lassie.settings"),
    "lassie.weights": ("lassie.weights", "lassie.fetch", "lassie.request", "lassie.settings"),
}


@pytest.mark.parametrize("package", sorted(RULES))
def test_a_torch_free_package_imports_no_torch_and_only_what_it_may(package: str) -> None:
    result = subprocess.run([sys.executable, "-c", CHECK, package, *RULES[package]], cwd=REPO,
                            capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    on_disk = {module.name for module in pkgutil.iter_modules([str(REPO / package.replace(".", "/"))])}
    assert {name.rsplit(".", 1)[-1] for name in report["modules"][1:]} == on_disk
    assert report["problems"] == []
