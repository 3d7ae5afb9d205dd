"""Write `.cog/openapi_schema.json` from predict.py with cog's own inspector.

The Cog HTTP server validates inputs only against this file (normally written by `cog build`);
without it every input would reach `predict` unchecked. Run this after changing the inputs:
`.venv/bin/python scripts/write_openapi_schema.py` (a test fails while the committed file is stale).
"""

from __future__ import annotations

import project_python  # noqa: F401  (first: under a Python without the project's packages, one line naming .venv/bin/python)

# isort: split
import json
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / ".cog" / "openapi_schema.json"


def _bound(value: float | None, json_type: str) -> int | float | None:
    if value is None:
        return None
    return int(value) if json_type == "integer" else value


def _property(field: Any, enums: dict[str, Any]) -> dict[str, Any]:
    """One input in the shape cog's schema generator emits (enums as $ref'd components)."""
    from cog._adt import Repetition

    type_schema = field.type.json_type()
    prop: dict[str, Any] = {"title": field.name.replace("_", " ").title(), "x-order": field.order}
    if field.choices:
        enums[field.name] = {"title": field.name, "description": "An enumeration.", "enum": field.choices,
                             **type_schema}
        prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
    else:
        prop.update(type_schema)
    if field.description:
        prop["description"] = field.description
    if field.default is not None:
        prop["default"] = field.default
    if field.type.repetition is Repetition.OPTIONAL:
        prop["nullable"] = True
    for key, value in (("minimum", field.ge), ("maximum", field.le)):
        bound = _bound(value, type_schema.get("type", ""))
        if bound is not None:
            prop[key] = bound
    return prop


def build_schema() -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from cog import _inspector
    from cog._adt import Repetition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor("predict", "Predictor")
    enums: dict[str, Any] = {}
    properties = {name: _property(field, enums) for name, field in info.inputs.items()}
    required = [name for name, field in info.inputs.items()
                if field.type.repetition is Repetition.REQUIRED and field.default is None]
    input_schema = {"title": "Input", "type": "object", "properties": properties, "required": required}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "requestBody": {"content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/PredictionRequest"}}}},
                    "responses": {"200": {"description": "Successful Response", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}},
                }
            }
        },
        "components": {
            "schemas": {
                "Input": input_schema,
                "Output": info.output.json_type(),
                **enums,
                "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                    "id": {"title": "Id", "type": "string"},
                    "input": {"$ref": "#/components/schemas/Input"},
                    "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
                }},
                "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                    "id": {"title": "Id", "type": "string"},
                    "input": {"$ref": "#/components/schemas/Input"},
                    "output": {"$ref": "#/components/schemas/Output"},
                    "status": {"title": "Status", "type": "string"},
                    "error": {"title": "Error", "type": "string"},
                    "logs": {"title": "Logs", "type": "string"},
                }},
            }
        },
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


def main() -> None:
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH.relative_to(REPO)}")


if __name__ == "__main__":
    main()
