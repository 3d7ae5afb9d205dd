"""predict.py's inputs against the public schema text, and the committed Cog OpenAPI file."""

from __future__ import annotations

import ast
import json
import re

import pytest
import write_openapi_schema
from conftest import REPO

from lassie.request.bounds import BOUNDS, CHOICES
from lassie.request.sizes import aspect_ratios

SPEC = REPO.parent / "shared" / "spec" / "replicate-model-schema.txt"
TYPES = {"string": "string", "string (enum)": "string", "integer": "integer", "number": "number",
         "boolean": "boolean"}


def parse_spec(text: str) -> dict[str, dict]:
    """Field blocks of the Replicate page: name, type, optional default, options, bounds, description."""
    lines = [line.strip() for line in text.split("Field Type Default value Description", 1)[1]
             .split("Output schema", 1)[0].splitlines() if line.strip()]
    fields: dict[str, dict] = {}
    index = 0
    while index < len(lines) - 1:
        name, kind = lines[index], lines[index + 1]
        if kind not in TYPES:
            index += 1
            continue
        field = {"type": TYPES[kind], "order": len(fields)}
        index += 2
        body = []
        while index < len(lines) and not (index + 1 < len(lines) and lines[index + 1] in TYPES):
            body.append(lines[index])
            index += 1
        if body and len(body[0]) < 12 and not body[0].startswith(("Min:", "Max:", "Options:")):
            field["default"] = body.pop(0)
        for i, line in enumerate(body):
            if line == "Options:":
                field["enum"] = [option.strip() for option in body[i + 1].split(",")]
            elif match := re.fullmatch(r"(Min|Max): (-?[\d.]+)", line):
                field["minimum" if match[1] == "Min" else "maximum"] = float(match[2])
        field["description"] = body[-1]
        fields[name] = field
    return fields


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((REPO / ".cog" / "openapi_schema.json").read_text())


def test_committed_openapi_schema_is_fresh(committed):
    assert committed == json.loads(write_openapi_schema.render()), (
        "run: python scripts/write_openapi_schema.py"
    )


def test_inputs_match_the_public_schema(committed):
    if not SPEC.is_file():
        pytest.skip("../shared/spec is not beside this checkout")
    spec = parse_spec(SPEC.read_text())
    schemas = committed["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    assert len(spec) == 20 and list(properties) == list(spec)
    assert schemas["Input"]["required"] == ["prompt"]
    for name, expected in spec.items():
        prop = properties[name]
        enum = schemas[name] if "allOf" in prop else None
        assert (enum or prop)["type"] == expected["type"], name
        assert prop["x-order"] == expected["order"], name
        assert prop["description"] == expected["description"], name
        if "default" in expected and expected["type"] in ("integer", "number"):
            assert prop["default"] == float(expected["default"]), name
        elif "default" in expected:
            assert str(prop["default"]).lower() == expected["default"].lower(), name
        else:
            assert "default" not in prop, name
        if "enum" in expected:
            assert enum["enum"] == expected["enum"], name
        for bound in ("minimum", "maximum"):
            if bound in expected:
                assert prop[bound] == expected[bound], (name, bound)
    assert schemas["Output"] == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}


def test_the_schema_bounds_and_choices_are_the_table(committed):
    """predict.py's Input(...) reads lassie.request.bounds, the table request validation and sizes check."""
    schemas = committed["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    for field, bound in BOUNDS.items():
        limits = (properties[field].get("minimum"), properties[field].get("maximum"))
        assert limits == ((None, None) if field == "seed" else (bound.low, bound.high)), field
    for field, options in CHOICES.items():
        assert schemas[field]["enum"] == list(options), field


def input_arguments() -> dict[str, dict[str, ast.expr]]:
    """Each `Input(...)` keyword of predict.py's `predict`, as source, by field name."""
    tree = ast.parse((REPO / "predict.py").read_text())
    predict = next(node for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef) and node.name == "predict")
    fields = [argument.arg for argument in predict.args.args[1:]]
    return {field: {keyword.arg: keyword.value for keyword in call.keywords}
            for field, call in zip(fields, predict.args.defaults, strict=True)}


def test_bounds_and_choices_are_literals_that_cog_build_reads_and_equal_the_table():
    """`cog build` reads predict.py as text: a bound or choice list that is not a literal is
    dropped from the schema or stops the build, so each is a literal, equal to the table."""
    arguments = input_arguments()
    expected_choices = {**{field: list(options) for field, options in CHOICES.items()},
                        "aspect_ratio": list(aspect_ratios())}
    for field, keywords in arguments.items():
        literals = {name: ast.literal_eval(value) for name, value in keywords.items() if name != "description"}
        if field in BOUNDS and field != "seed":
            assert (literals["ge"], literals["le"]) == (BOUNDS[field].low, BOUNDS[field].high), field
        if field in expected_choices:
            assert literals["choices"] == expected_choices[field], field
    assert set(expected_choices) | set(BOUNDS) - {"seed"} <= set(arguments)
