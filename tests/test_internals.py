"""Library internals live in one module, which names the versions it was checked against: an
upgrade of any of them fails here until `lassie/engine/internals.py` is audited and its versions bumped."""

from __future__ import annotations

import ast
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import REPO
from lassie.engine.internals import CHECKED_AGAINST
from lassie.weights.provision import git_blob_sha1

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
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("huggingface_hub.utils."):
                offenders.append(f"{path.name}: {node.module}")  # e.g. utils.sha's git_hash: hashlib does it
            if isinstance(node, ast.Attribute) and node.attr in ("_NATIVE_CUDNN", "_FLASH_3"):
                offenders.append(f"{path.name}: {node.attr}")
            offenders += [f"{path.name}: {name}" for name in torch_internals(node)]
    assert offenders == []


def torch_internals(node: ast.AST) -> list[str]:
    """torch's underscore modules and attributes (`torch._dynamo.config`, `from torch._inductor import ...`)."""
    if isinstance(node, ast.ImportFrom | ast.Import):
        modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
        return [module for module in modules if module.startswith("torch.") and "._" in f".{module}"]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        return [f"torch.{node.attr}"] if private else []
    return []


def test_torch_internals_are_recognised():
    found = [name for source in ("import torch._inductor.config", "from torch._dynamo.utils import counters",
                                 "torch._dynamo.config.recompile_limit = 1", "torch.__version__", "torch.compiler.x")
             for node in ast.walk(ast.parse(source)) for name in torch_internals(node)]
    assert found == ["torch._inductor.config", "torch._dynamo.utils", "torch._dynamo"]


@pytest.mark.parametrize("content", [b"", b"{}\n", bytes(range(256)) * 9000])
def test_the_git_blob_id_is_what_git_computes(tmp_path: Path, content: bytes):
    """The id the hub lists for a file outside LFS, streamed in chunks smaller than the file."""
    path = tmp_path / "file"
    path.write_bytes(content)
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout
    assert git_blob_sha1(path) == expected.strip()
