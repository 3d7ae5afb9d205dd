"""cog-safe-push.yaml: every case is one the published schema accepts, and the cases cover the model.

cog-safe-push runs the cases on Replicate only; here each case's inputs are checked against
`.cog/openapi_schema.json` (names, types, choices, bounds) as coglet would check them, so a case
never fails for a typo, and the config's shape against cog-safe-push's own (TestCase fields).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from conftest import REPO

CHECKERS = ("exact_string", "match_url", "match_prompt", "error_contains")
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cog-safe-push.yaml").read_text())


def cases() -> list[dict[str, Any]]:
    return config()["predict"]["test_cases"]


def schema_problems(inputs: dict[str, Any]) -> list[str]:
    """What coglet would refuse (HTTP 422) in these inputs, by the published schema."""
    schema = json.loads((REPO / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]
    fields = schema["Input"]["properties"]
    problems = [f"{name}: required" for name in schema["Input"]["required"] if name not in inputs]
    for name, value in inputs.items():
        field = fields.get(name)
        if field is None:
            problems.append(f"{name}: not an input")
            continue
        for reference in field.get("allOf", []):
            choices = schema[reference["$ref"].rsplit("/", 1)[-1]]["enum"]
            if value not in choices:
                problems.append(f"{name}: {value!r} not one of {choices}")
        wanted = JSON_TYPES.get(field.get("type", ""))
        if wanted and (not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool))):
            problems.append(f"{name}: {value!r} is not a {field['type']}")
        elif wanted is not None and field.get("format") == "uri" and not value.startswith(("http://", "https://")):
            problems.append(f"{name}: {value!r} is not an http(s) URL")
        elif "minimum" in field and not field["minimum"] <= value <= field["maximum"]:
            problems.append(f"{name}: {value!r} outside {field['minimum']}..{field['maximum']}")
    return problems


@pytest.mark.parametrize("case", cases(), ids=lambda case: case["inputs"]["prompt"][:40])
def test_each_case_is_accepted_by_the_schema_and_has_at_most_one_checker(case: dict[str, Any]) -> None:
    assert set(case) <= {"inputs", *CHECKERS}
    assert sum(checker in case for checker in CHECKERS) <= 1
    assert schema_problems(case["inputs"]) == []


def test_the_validator_catches_what_coglet_refuses() -> None:
    """The check above could not fail if this one did not."""
    assert schema_problems({"prompt": "x", "model": "pro", "width": 100, "go_fast": "yes", "seed": 1.5,
                            "image": "/local/file.png", "lora_weights": "x"}) == [
        "model: 'pro' not one of ['dev', 'schnell']", "width: 100 outside 256..1440",
        "go_fast: 'yes' is not a boolean", "seed: 1.5 is not a integer",
        "image: '/local/file.png' is not an http(s) URL", "lora_weights: not an input"]
    assert schema_problems({"model": "dev"}) == ["prompt: required"]


def test_the_cases_cover_both_models_go_fast_every_mode_a_custom_size_and_an_extra_lora() -> None:
    inputs = [case["inputs"] for case in cases() if "error_contains" not in case]
    assert {case.get("model", "dev") for case in inputs} == {"dev", "schnell"}
    assert any(case.get("go_fast") for case in inputs)
    assert any("image" in case and "mask" not in case for case in inputs)
    assert any("image" in case and "mask" in case for case in inputs)
    assert any(case.get("aspect_ratio") == "custom" and "width" in case and "height" in case for case in inputs)
    assert any(case.get("extra_lora") for case in inputs)


def test_the_config_has_only_keys_cog_safe_push_knows() -> None:
    settings = config()
    assert set(settings) <= {"model", "test_model", "test_hardware", "predict", "train", "deployment", "dockerfile",
                             "parallel", "fast_push", "use_cog_base_image", "ignore_schema_compatibility",
                             "official_model"}
    assert set(settings["predict"]) <= {"compare_outputs", "predict_timeout", "test_cases", "fuzz"}
    assert set(settings["predict"]["fuzz"]) <= {"fixed_inputs", "disabled_inputs", "iterations"}
    assert schema_problems({"prompt": "x", **settings["predict"]["fuzz"]["fixed_inputs"]}) == []
