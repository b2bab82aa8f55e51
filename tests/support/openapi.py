"""Validate our JSON against the official OpenAI API description."""

from __future__ import annotations

import copy
import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from tests.support.paths import OPENAPI_SPEC


def _rewrite_nullable(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` means nothing to JSON Schema: turn it into `anyOf [..., null]`."""
    if isinstance(node, list):
        return [_rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _rewrite_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _components() -> dict[str, Any]:
    spec = json.loads(OPENAPI_SPEC.read_text())
    return _rewrite_nullable(copy.deepcopy(spec["components"]))


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError when `instance` is not a valid `schema_name`."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    Draft202012Validator(schema).validate(instance)
