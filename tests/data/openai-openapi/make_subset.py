"""Rebuild schemas.json: the component schemas the tests validate against, with everything
they reference, cut from the OpenAI OpenAPI document (openapi.yaml of openai/openai-openapi).

    python tests/data/openai-openapi/make_subset.py PATH/TO/openapi.yaml

Not run by the tests; it records how the file was made. The schemas are copied unchanged (the
tests rewrite `nullable: true` when they load them, see tests/openai_schema.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

# every schema a test passes to openai_schema.check()
ROOTS = ("ListModelsResponse", "CreateChatCompletionResponse",
         "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "CreateEmbeddingResponse", "ErrorResponse")  # fmt: skip
PREFIX = "#/components/schemas/"


def refs(node) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"][len(PREFIX) :]} if isinstance(node.get("$ref"), str) else set()
        return out.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def subset(schemas: dict) -> dict:
    keep, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += sorted(refs(schemas[name]))
    return {name: schemas[name] for name in sorted(keep)}


def main(spec: Path) -> None:
    raw = spec.read_bytes()
    doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    out = {"openapi": doc["openapi"], "info": {"title": doc["info"]["title"],
           "version": doc["info"]["version"], "x-source-sha256": hashlib.sha256(raw).hexdigest()},
           "components": {"schemas": subset(doc["components"]["schemas"])}}  # fmt: skip
    dest = Path(__file__).with_name("schemas.json")
    dest.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{dest}: {len(out['components']['schemas'])} schemas, {dest.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
