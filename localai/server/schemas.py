"""Request-body schemas (JSON Schema 2020-12): one source for validating what clients send and for
the OpenAPI document served at /openapi.json.

Schemas are permissive about unknown fields (clients send many we ignore) and strict about the
types of the fields we read, so a wrong type is a 400 naming the field, never a crash deeper in.
Token-id prompts are not accepted: ids outside the vocabulary would reach llama.cpp unchecked.
"""

from __future__ import annotations

from jsonschema import Draft202012Validator

from ..index import MODES, UNITS
from ..rag.prompt import LAYOUTS
from .errors import bad_request

NUM = {"type": ["number", "null"]}
INT = {"type": ["integer", "null"]}
BOOL = {"type": ["boolean", "null"]}
STR = {"type": ["string", "null"]}
POS_INT = {"type": ["integer", "null"], "minimum": 1}
STOP = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": 16},
        {"type": "null"},
    ]
}
TEMPERATURE = {"type": ["number", "null"], "minimum": 0, "maximum": 2}
TOP_P = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
DOCS = {  # our extension: answer from the indexed documents
    "anyOf": [
        {"type": "boolean"},
        {
            "type": "object",
            "properties": {
                "k": {"type": "integer", "minimum": 1, "maximum": 50},
                "source": {"type": "string"},
                "layout": {"enum": list(LAYOUTS)},  # default: the loaded model's
            },
        },
        {"type": "null"},
    ]
}
SAMPLING = {
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "top_k": {"type": ["integer", "null"], "minimum": 0},
    "min_p": {"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": 1},
    "repeat_penalty": {"type": ["number", "null"], "minimum": 0},
    "seed": INT,
    "stop": STOP,
    "stream": BOOL,
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": BOOL},
    },
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "user": STR,
    "docs": DOCS,
    "stats": BOOL,  # our extension: the engine's GenerationStats on the last chunk
    "keep_alive": {"type": ["string", "number", "null"]},  # our extension, as Ollama's
}
TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
FUNCTION = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
        "description": {"type": "string"},
        "parameters": {"type": "object"},
        "strict": BOOL,
    },
}
TOOLS = {
    "type": ["array", "null"],
    "maxItems": 128,
    "items": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {"type": {"const": "function"}, "function": FUNCTION},
    },
}
TOOL_CALLS = {  # what an assistant message called (arguments: OpenAI a string, Ollama an object)
    "type": ["array", "null"],
    "items": {
        "type": "object",
        "required": ["function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "arguments": {"type": ["string", "object"]},
                },
            },
        },
    },
}
TOOL_CHOICE = {
    "anyOf": [
        {"enum": ["none", "auto", "required", None]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                },
            },
        },
    ]
}
CHAT_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "tool_calls": TOOL_CALLS,
        "tool_call_id": {"type": "string"},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": TEXT_PART},
                {"type": "null"},
            ]
        },
        "name": {"type": "string"},
    },
}
MODEL = {"type": "string", "minLength": 1}

CHAT_COMPLETION = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": MODEL,
        "messages": {"type": "array", "items": CHAT_MESSAGE, "minItems": 1},
        "max_tokens": POS_INT,
        "max_completion_tokens": POS_INT,
        "logprobs": {"type": ["boolean", "null"], "enum": [False, None]},
        "tools": TOOLS,
        "tool_choice": TOOL_CHOICE,
        "parallel_tool_calls": BOOL,
        **SAMPLING,
    },
}
COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": MODEL,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            ]
        },
        "suffix": STR,
        "max_tokens": POS_INT,
        "echo": BOOL,
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
        "logprobs": {"type": ["integer", "null"], "enum": [0, None]},
        **SAMPLING,
    },
}
EMBEDDING = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": MODEL,
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2048},
            ]
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": {"type": "string"},
    },
}

OLLAMA_OPTIONS = {
    "type": ["object", "null"],
    "properties": {
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "min_p": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "repeat_penalty": {"type": "number", "minimum": 0},
        "seed": {"type": "integer"},
        "num_predict": {"type": "integer"},
        "num_ctx": {"type": "integer"},
        "stop": {"type": "array", "items": {"type": "string"}},
    },
}
OLLAMA_COMMON = {
    "model": MODEL,
    "stream": BOOL,
    "options": OLLAMA_OPTIONS,
    "keep_alive": {"type": ["string", "number", "null"]},
    "docs": DOCS,
}
OLLAMA_CHAT = {
    "type": "object",
    "required": ["model"],
    "properties": {
        **OLLAMA_COMMON,
        "messages": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "user", "assistant", "tool"]},
                    "content": STR,
                    "tool_calls": TOOL_CALLS,
                    "tool_name": {"type": "string"},
                },
            },
        },
        "tools": TOOLS,
    },
}
OLLAMA_GENERATE = {
    "type": "object",
    "required": ["model"],
    "properties": {
        **OLLAMA_COMMON,
        "prompt": STR,
        "suffix": STR,
        "system": STR,
        "raw": BOOL,
    },
}
OLLAMA_EMBED = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": MODEL,
        "input": EMBEDDING["properties"]["input"],
        "truncate": BOOL,
        "options": OLLAMA_OPTIONS,
        "keep_alive": OLLAMA_COMMON["keep_alive"],
    },
}
OLLAMA_EMBEDDINGS = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {"model": MODEL, "prompt": {"type": "string"}},
}
OLLAMA_SHOW = {
    "type": "object",
    "properties": {"model": MODEL, "name": MODEL, "verbose": BOOL},
    "anyOf": [{"required": ["model"]}, {"required": ["name"]}],
}

_validators: dict[int, Draft202012Validator] = {}


def validate(schema: dict, body: object) -> dict:
    """`body` if it matches `schema`; else a 400 naming the first offending field."""
    v = _validators.get(id(schema))
    if v is None:
        v = _validators[id(schema)] = Draft202012Validator(schema)
    errors = sorted(v.iter_errors(body), key=lambda e: (len(e.absolute_path), e.message))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or None
        msg = e.message if len(e.message) < 200 else e.message[:200] + "…"
        raise bad_request(f"{where or 'body'}: {msg}" if where else msg, param=where)
    assert isinstance(body, dict)
    return body


LOCALAI_SEARCH = {  # POST /localai/search: our own route, not part of either compatible API
    "type": "object",
    "required": ["query"],
    "additionalProperties": False,
    "properties": {
        "query": {"type": "string", "minLength": 1},
        "k": {"type": "integer", "minimum": 1, "maximum": 1000},
        "mode": {"enum": list(MODES)},
        "unit": {"enum": list(UNITS)},
        "under": {"type": "string", "minLength": 1},
    },
}

# llama-server's tokenizer routes, which remote engines (localai's among them) count with
TOKENIZE = {
    "type": "object",
    "required": ["content"],
    "properties": {"content": {"type": "string"}, "add_special": BOOL, "parse_special": BOOL,
                   "with_pieces": {"type": ["boolean", "null"], "enum": [False, None]}},
}  # fmt: skip
APPLY_TEMPLATE = {
    "type": "object",
    "required": ["messages"],
    "properties": {"messages": CHAT_COMPLETION["properties"]["messages"], "tools": TOOLS},
}
