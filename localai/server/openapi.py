"""The OpenAPI 3.1 document served at /openapi.json, built from the same request schemas the
routes validate with, so the document cannot drift from what the server accepts."""

from __future__ import annotations

from functools import lru_cache

from .. import __version__
from . import schemas

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"anyOf": [{"type": "object"}, {"type": "string"}]}},
}
OBJECT = {"type": "object"}


class _Narrowed:
    """The request schemas, each with `model` narrowed to the models that route serves."""

    def __init__(self, chat: tuple[str, ...], embed: tuple[str, ...]):
        for name in dir(schemas):
            value = getattr(schemas, name)
            if (
                name.isupper()
                and isinstance(value, dict)
                and "model" in value.get("properties", {})
            ):
                both = chat + embed if name == "OLLAMA_SHOW" else None
                names = both or (embed if "EMBED" in name else chat)
                setattr(self, name, _with_models(value, names))


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _responses(ok_media: tuple[str, ...] = ("application/json",)) -> dict:
    def err(desc: str) -> dict:
        return {"description": desc, "content": _json(ERROR)}

    return {
        "200": {"description": "OK", "content": {m: {"schema": {}} for m in ok_media}},
        "400": err("invalid request"),
        "401": err("missing or wrong bearer token"),
        "404": err("unknown model"),
        "413": err("request body too large"),
    }


def _post(summary: str, schema: dict, streams: str | None = None) -> dict:
    media = ("application/json",) + ((streams,) if streams else ())
    body = {"required": True, "content": _json(schema)}
    return {"post": {"summary": summary, "requestBody": body, "responses": _responses(media)}}


def _get(summary: str) -> dict:
    return {"get": {"summary": summary, "responses": _responses()}}


def _with_models(schema: dict, names: tuple[str, ...]) -> dict:
    """`schema` with `model` narrowed to the names served, so that generated requests (docs
    readers, fuzzers) reach the model; the server itself answers other names with a 404."""
    props = schema["properties"] | {"model": {"type": "string", "enum": list(names)}}
    props |= {"name": props["model"]} if "name" in props else {}
    return schema | {"properties": props}


@lru_cache(maxsize=4)
def openapi_document(chat: tuple[str, ...], embed: tuple[str, ...]) -> dict:
    """The document for a server whose chat models are `chat` and embedding models `embed`."""
    sse, nd = "text/event-stream", "application/x-ndjson"
    S = _Narrowed(chat, embed)
    paths = {
        "/health": {"get": {"summary": "liveness (no token needed)", "security": [],
                            "responses": {"200": {"description": "OK",
                                                  "content": _json(OBJECT)}}}},
        "/v1/models": _get("models served (OpenAI)"),
        "/v1/chat/completions": _post("chat completion (OpenAI)", S.CHAT_COMPLETION, sse),
        "/v1/completions": _post("text completion, fill-in-the-middle with suffix (OpenAI)",
                                 S.COMPLETION, sse),
        "/v1/embeddings": _post("embeddings (OpenAI)", S.EMBEDDING),
        "/tokenize": _post("token ids of a text (llama-server's shape)", schemas.TOKENIZE),
        "/apply-template": _post("a chat rendered by the model's template (llama-server's "
                                 "shape)", schemas.APPLY_TEMPLATE),
        "/api/chat": _post("chat (Ollama)", S.OLLAMA_CHAT, nd),
        "/api/generate": _post("generate, fill-in-the-middle with suffix (Ollama)",
                               S.OLLAMA_GENERATE, nd),
        "/api/embed": _post("embeddings (Ollama)", S.OLLAMA_EMBED),
        "/api/embeddings": _post("one embedding (older Ollama route)", S.OLLAMA_EMBEDDINGS),
        "/api/show": _post("model details (Ollama)", S.OLLAMA_SHOW),
        "/api/tags": _get("installed models (Ollama)"),
        "/api/ps": _get("loaded models (Ollama)"),
        "/api/version": _get("server version (Ollama)"),
        "/localai/search": _post("passages from the document index, read back from the files "
                                 "and checked (localai's own)", schemas.LOCALAI_SEARCH),
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "localai", "version": __version__,
                 "description": "OpenAI- and Ollama-compatible API of the localai daemon."},
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }  # fmt: skip
