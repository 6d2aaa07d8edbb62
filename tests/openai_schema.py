"""Validate bodies against the OpenAI OpenAPI document in shared/evals/openai-openapi/.

The document still carries old-style `nullable: true` keys; each such schema is rewritten as
`anyOf: [schema, {type: null}]` before validating (see that folder's README)."""

from __future__ import annotations

from functools import cache, lru_cache

import yaml
from conftest import SHARED
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = SHARED / "evals" / "openai-openapi" / "openapi.yaml"
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
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = _nullable_to_null(yaml.load(SPEC.read_text(), Loader=loader))
    return Registry().with_resource(URI, Resource.from_contents(doc, DRAFT202012))


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"},
                                registry=_registry())  # fmt: skip


def check(name: str, body: dict) -> None:
    """Raise jsonschema.ValidationError if `body` is not a valid `name`."""
    validator(name).validate(body)
