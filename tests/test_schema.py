"""predict.py's inputs against the public schema text (the same fields, and compatible by cog-safe-push's
rules), and the committed Cog OpenAPI file."""

from __future__ import annotations

import ast
import copy
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


# The page prints no formats for inputs; image and mask are the published version's file inputs (cog.Path),
# which cog's schema writes as `"format": "uri"`.
PUBLISHED_FILE_INPUTS = ("image", "mask")


def published_schemas(text: str) -> dict:
    """The published version's schema components, rebuilt from its page in the shape cog-safe-push compares.

    The page prints no "Min: 0": output_quality is "from 0 to 100" by its description, yet shows only
    "Max: 100". So a field with a maximum and no minimum is read as minimum 0. Defaults stay page text:
    the rules ask only whether an input has one."""
    schemas: dict = {}
    properties: dict = {}
    for name, field in parse_spec(text).items():
        if "enum" in field:
            schemas[name] = {"type": field["type"], "enum": field["enum"]}
            properties[name] = {"allOf": [{"$ref": f"#/components/schemas/{name}"}]}
            continue
        prop = {"type": field["type"]}
        if "maximum" in field:
            prop["minimum"] = field.get("minimum", 0.0)
        elif "minimum" in field:
            prop["minimum"] = field["minimum"]
        if "maximum" in field:
            prop["maximum"] = field["maximum"]
        if name in PUBLISHED_FILE_INPUTS:
            prop["format"] = "uri"
        if "default" in field:
            prop["default"] = field["default"]
        properties[name] = prop
    schemas["Input"] = {"properties": properties}
    schemas["Output"] = ast.literal_eval(text.rsplit("Schema", 1)[1].strip())
    return schemas


def choices_of(schemas: dict, spec: dict) -> dict:
    """An input's enum component (cog writes choices as a $ref'd schema), or {} when it has none."""
    if "allOf" not in spec:
        return {}
    return schemas[spec["allOf"][0]["$ref"].rsplit("/", 1)[-1]]


def compatibility_problems(published: dict, current: dict) -> list[str]:
    """What cog-safe-push refuses when `current` replaces `published` (its schema compatibility rules):
    an input removed, a type or format changed, a minimum raised, a maximum lowered or either bound
    added, an enum choice removed, a new input without a default; and the output type changed."""
    problems = []
    old_inputs, new_inputs = published["Input"]["properties"], current["Input"]["properties"]
    for name, old in old_inputs.items():
        new = new_inputs.get(name)
        if new is None:
            problems.append(f"{name}: removed")
        elif "allOf" in old:
            old_enum, new_enum = choices_of(published, old), choices_of(current, new)
            if new_enum.get("type") != old_enum["type"]:
                problems.append(f"{name}: choices' type changed")
            elif missing := [choice for choice in old_enum["enum"] if choice not in new_enum["enum"]]:
                problems.append(f"{name}: choices removed: {missing}")
        elif new.get("type") != old["type"]:
            problems.append(f"{name}: type changed from {old['type']} to {new.get('type')}")
        else:
            for bound, tighter in (("minimum", float.__gt__), ("maximum", float.__lt__)):
                if bound in new and bound not in old:
                    problems.append(f"{name}: {bound} added")
                elif bound in new and tighter(float(new[bound]), float(old[bound])):
                    problems.append(f"{name}: {bound} tightened")
            if new.get("format", "") != old.get("format", ""):
                problems.append(f"{name}: format changed")
    problems += [f"{name}: new and required" for name, spec in new_inputs.items()
                 if name not in old_inputs and "default" not in spec]
    if current["Output"]["type"] != published["Output"]["type"]:
        problems.append("output: type changed")
    return problems


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


def test_the_schema_is_compatible_with_the_published_one_by_cog_safe_push_rules(committed):
    if not SPEC.is_file():
        pytest.skip("../shared/spec is not beside this checkout")
    assert compatibility_problems(published_schemas(SPEC.read_text()), committed["components"]["schemas"]) == []


def test_every_input_has_a_description_as_cog_safe_push_lint_requires(committed):
    properties = committed["components"]["schemas"]["Input"]["properties"]
    assert [name for name, spec in properties.items() if not spec.get("description", "").strip()] == []


def test_the_compatibility_check_catches_each_rule_cog_safe_push_applies(committed):
    """The compatibility test above could not fail if this one did not."""
    if not SPEC.is_file():
        pytest.skip("../shared/spec is not beside this checkout")
    published = published_schemas(SPEC.read_text())

    def problems_after(change) -> list[str]:
        current = copy.deepcopy(committed["components"]["schemas"])
        change(current, current["Input"]["properties"])
        return compatibility_problems(published, current)

    assert problems_after(lambda s, p: p.pop("seed")) == ["seed: removed"]
    assert problems_after(lambda s, p: p["num_outputs"].update(type="number")) == [
        "num_outputs: type changed from integer to number"]
    assert problems_after(lambda s, p: p["num_outputs"].update(minimum=2)) == ["num_outputs: minimum tightened"]
    assert problems_after(lambda s, p: p["num_inference_steps"].update(maximum=40)) == [
        "num_inference_steps: maximum tightened"]
    assert problems_after(lambda s, p: p["seed"].update(minimum=0, maximum=2**32)) == [
        "seed: minimum added", "seed: maximum added"]
    assert problems_after(lambda s, p: p["image"].pop("format")) == ["image: format changed"]
    assert problems_after(lambda s, p: p["extra_lora"].update(format="uri")) == ["extra_lora: format changed"]
    assert problems_after(lambda s, p: s["output_format"]["enum"].remove("png")) == [
        "output_format: choices removed: ['png']"]
    assert problems_after(lambda s, p: s["megapixels"].update(type="number")) == ["megapixels: choices' type changed"]
    assert problems_after(lambda s, p: p.update(style={"type": "string", "description": "x"})) == [
        "style: new and required"]
    assert problems_after(lambda s, p: s["Output"].update(type="string")) == ["output: type changed"]
    # What cog-safe-push allows: a looser bound, a new choice, a new input with a default, a new default.
    assert problems_after(lambda s, p: (p["num_outputs"].update(minimum=0, maximum=8, default=2),
                                        s["output_format"]["enum"].append("gif"),
                                        p.update(style={"type": "string", "default": "x"}))) == []


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
