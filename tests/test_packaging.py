"""The build files agree with each other: what `cog build` installs is what the tests ran."""

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


def test_weights_stay_out_of_the_image_except_the_manifest():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "weights/*" in lines and "!weights/manifest.json" in lines
