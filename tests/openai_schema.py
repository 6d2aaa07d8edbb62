"""Validate bodies against the OpenAI OpenAPI schemas shipped in tests/data/openai-openapi/ (the
parts of the official document the tests use, MIT; see that folder's README).

The document still carries old-style `nullable: true` keys; each such schema is rewritten as
`anyOf: [schema, {type: null}]` before validating."""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).parent / "data" / "openai-openapi" / "schemas.json"
URI = "urn:openai-openapi"


def _nullable_to_null(node):
    if isinstance(node, list):
        return [_nullable_to_null(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_null(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=1)
def _registry() -> Registry:
    doc = _nullable_to_null(json.loads(SPEC.read_text()))
    return Registry().with_resource(URI, Resource.from_contents(doc, DRAFT202012))


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"},
                                registry=_registry())  # fmt: skip


def check(name: str, body: dict) -> None:
    """Raise jsonschema.ValidationError if `body` is not a valid `name`."""
    validator(name).validate(body)
