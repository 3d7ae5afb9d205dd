"""Library internals live in one module, which names the versions it was checked against: an
upgrade of any of them fails here until `lassie/engine/internals.py` is audited and its versions bumped."""

from __future__ import annotations

import ast
from importlib.metadata import version

from conftest import REPO
from lassie.engine.internals import CHECKED_AGAINST

PRIVATE_IMPORTS = ("_create_lora_config", "get_pattern_key", "set_adapters_for_text_encoder", "delete_adapter_layers")


def test_the_installed_libraries_are_the_versions_the_internals_were_checked_against():
    installed = {name: version(name).split("+")[0] for name in CHECKED_AGAINST}
    assert installed == CHECKED_AGAINST


def test_no_other_module_imports_a_library_internal():
    """Underscore names from diffusers, peft or torch, and the helpers listed, only in internals.py."""
    offenders = []
    for path in (REPO / "lassie").rglob("*.py"):
        if path.name == "internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("diffusers", "peft"):
                offenders += [f"{path.name}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") or alias.name in PRIVATE_IMPORTS]
            if isinstance(node, ast.Attribute) and node.attr in ("_NATIVE_CUDNN", "_FLASH_3"):
                offenders.append(f"{path.name}: {node.attr}")
    assert offenders == []
