"""The build files agree with each other: what `cog build` installs is what the tests ran."""

import fnmatch
import re
import tomllib

import yaml

from conftest import REPO


def test_cog_requirements_equal_the_project_dependencies():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [line for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert sorted(requirements) == sorted(pyproject["project"]["dependencies"])


def test_cog_yaml_builds_for_a_gpu_and_points_at_the_predictor():
    config = yaml.safe_load((REPO / "cog.yaml").read_text())
    assert config["build"]["gpu"] is True
    assert config["build"]["python_requirements"] == "requirements.txt"
    assert config["predict"] == "predict.py:Predictor"


def docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides
    (`*` stays within one folder, `!` re-includes)."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        include = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        depth = pattern.count("/") + 1
        if len(parts) >= depth and fnmatch.fnmatchcase("/".join(parts[:depth]), pattern) and (
                "*" not in pattern or all("/" not in part for part in parts[:depth])):
            ignored = not include
    return ignored


def test_weights_stay_out_of_the_image_except_the_manifest_and_compile_artifacts():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert docker_ignores("weights/flux-dev/transformer/model.safetensors", patterns)
    assert docker_ignores("weights/compile-cache/fxgraph/ab/entry", patterns)
    assert docker_ignores("weights/lora-cache/x.safetensors", patterns)
    assert not docker_ignores("weights/manifest.json", patterns)
    assert not docker_ignores("weights/compile-cache/artifacts_torch-2.13.0_cuda.bin", patterns)
    assert not docker_ignores("lassie/predictor.py", patterns)


# CUDA versions each torch release is published for. Sources: for 2.11.0 and 2.12.1, cog's own table
# (pkg/config/torch_compatibility.json in replicate/cog), through which `cog build` resolves torch from
# `cuda:`; for 2.13.0, which that table does not list yet, the builds seen in public indexes and lockfiles
# (shared/spec/FACTS.md, "torch builds by CUDA version"). Neither has a 12.8 build after 2.11.
TORCH_CUDA_BUILDS = {
    "2.11.0": {"12.6", "12.8", "13.0"},
    "2.12.1": {"12.6", "12.9", "13.0", "13.2"},
    "2.13.0": {"12.6", "12.9", "13.0", "13.2"},
}
# The newest torch in cog's table: a CUDA version cog knows (base images, index URL) for current torch.
COG_TABLE_NEWEST_TORCH = "2.12.1"


def test_cog_yaml_cuda_is_one_torch_ships_and_cog_knows():
    cuda = str(yaml.safe_load((REPO / "cog.yaml").read_text())["build"]["cuda"])
    [torch_pin] = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    torch_version = torch_pin.removeprefix("torch==")
    assert torch_version in TORCH_CUDA_BUILDS, f"torch {torch_version}: add its CUDA builds to TORCH_CUDA_BUILDS"
    builds = sorted(TORCH_CUDA_BUILDS[torch_version])
    assert cuda in builds, f"cog.yaml asks for CUDA {cuda}, but torch {torch_version} is built for {builds}"
    assert cuda in TORCH_CUDA_BUILDS[COG_TABLE_NEWEST_TORCH], f"cog's table has no CUDA {cuda} for current torch"


def test_the_architecture_doc_names_every_module_and_only_modules_that_exist():
    documented = set(re.findall(r"^\| `(lassie/[\w/]+\.py)` \|", (REPO / "docs" / "architecture.md").read_text(), re.M))
    modules = {path.relative_to(REPO).as_posix() for path in (REPO / "lassie").rglob("*.py")} - {"lassie/__init__.py"}
    assert documented == modules


def test_every_lassie_package_is_packaged():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {path.parent.relative_to(REPO).as_posix().replace("/", ".") for path in (REPO / "lassie").rglob("__init__.py")}
    assert set(pyproject["tool"]["setuptools"]["packages"]) == packages


def test_every_data_file_in_lassie_is_package_data():
    """sizes.json (and any data file) ships: a wheel that lacks it fails at the first request."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data = {path for path in (REPO / "lassie").rglob("*") if path.is_file() and path.suffix not in {".py", ".pyc"}}
    assert data, "lassie/request/sizes.json is expected"
    for path in data:
        package = path.parent.relative_to(REPO).as_posix().replace("/", ".")
        assert any(path.match(pattern) for pattern in package_data.get(package, [])), path
