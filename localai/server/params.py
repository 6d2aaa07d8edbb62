"""From a validated request body to what the engine takes: messages, prompt tokens, sampling.

Shared by the OpenAI and Ollama routes, so both APIs agree on defaults, on how the model name is
matched (`name`, `name:latest`, and `name+docs` for answers from the indexed documents) and on the
one rule that matters most: a prompt that does not fit the context is refused with both counts,
before the request waits for the slot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..engine import ContextOverflowError, Engine, EngineError, Message, SamplingParams
from ..engine.base import check_fits
from ..engine.fim import fim_prompt, fim_stops
from ..engine.remote_http import RemoteError
from .errors import APIError, bad_request, model_not_found
from .tool_bridge import calls_of, tool_name

DOCS_SUFFIX = "+docs"


@dataclass
class Target:
    """What a request's `model` field asked for."""

    model: str  # the loaded model's name
    docs: bool  # answer from the document index (RAG)


def resolve_model(engine: Engine, requested: object, docs_field: object = None) -> Target:
    name = str(requested)
    docs = name.endswith(DOCS_SUFFIX)
    if docs:
        name = name[: -len(DOCS_SUFFIX)]
    name = name.removesuffix(":latest")
    if name != engine.name:
        raise model_not_found(requested, [engine.name, engine.name + DOCS_SUFFIX])
    return Target(engine.name, docs or bool(docs_field))


def message_text(content: object) -> str:
    """OpenAI content is a string or a list of text parts (validated by the schema)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def to_messages(raw: list[dict]) -> list[Message]:
    """Messages of either API, with the tool calls an assistant made and the tool results."""
    out: list[Message] = []
    for i, m in enumerate(raw):
        role = "system" if m["role"] == "developer" else m["role"]
        msg = Message(role, message_text(m.get("content")), tool_calls=calls_of(m, i))
        if role == "tool":
            msg.name = tool_name(m, out)
        out.append(msg)
    return out


def sampling(
    *,
    temperature=None,
    top_p=None,
    top_k=None,
    min_p=None,
    seed=None,
    max_tokens=None,
    stop=None,
    repeat_penalty=None,
) -> SamplingParams:
    """SamplingParams with engine defaults for what the client left out. top_p 0 means greedy."""
    d = SamplingParams()
    if top_p is not None and top_p <= 0:
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            temperature=d.temperature if temperature is None else float(temperature),
            top_p=d.top_p if top_p is None else float(top_p),
            top_k=d.top_k if top_k is None else int(top_k),
            min_p=d.min_p if min_p is None else float(min_p),
            seed=None if seed is None else int(seed) & 0xFFFFFFFF,
            max_tokens=None if max_tokens is None else int(max_tokens),
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            repeat_penalty=d.repeat_penalty if repeat_penalty is None else float(repeat_penalty),
        )
    except EngineError as e:
        raise bad_request(str(e)) from e


def chat_prompt(engine: Engine, messages: list[Message], tools: list[dict] | None = None) -> str:
    try:
        return engine.apply_chat_template(messages, tools=tools)
    except RemoteError:
        raise  # the model's server failed, not the request: a 502 (app.py)
    except EngineError as e:
        raise bad_request(str(e), param="messages") from e


def completion_prompt(engine: Engine, prompt: str, suffix: str | None) -> str:
    """The prompt text; with a suffix, the model's fill-in-the-middle layout."""
    if suffix is None:
        return prompt
    try:
        return fim_prompt(engine, prompt, suffix)
    except RemoteError:
        raise
    except EngineError as e:
        raise bad_request(str(e), param="suffix", code="fim_unsupported") from e


def add_fim_stops(params: SamplingParams, suffix: str | None) -> None:
    if suffix:
        params.stop.extend(s for s in fim_stops(suffix) if s not in params.stop)


def prompt_tokens(
    engine: Engine, prompt: str, params: SamplingParams, param: str = "messages"
) -> list[int]:
    """Tokenize and refuse (400, both counts) a prompt that leaves no room for the answer."""
    tokens = engine.tokenize(prompt)
    if not tokens:  # no BOS and no text: nothing to condition on
        raise bad_request("the prompt is empty", param=param)
    try:
        check_fits(len(tokens), params.max_tokens, engine.context_length)
    except ContextOverflowError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
    return tokens


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


# a \uD800-\uDFFF escape: JSON may pair it (one character) or leave it alone (a lone
# surrogate, which no tokenizer can encode to UTF-8)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_json(request) -> object:
    """The parsed body; 400 for an empty body, bad UTF-8, malformed JSON, NaN or Infinity. A
    lone surrogate in a string becomes "?", as it would in any UTF-8 text."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    if not _SURROGATE_ESCAPE.search(raw):
        return body
    try:
        return _encodable(body)
    except RecursionError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e


def _encodable(value: object) -> object:
    from ..index.embedder import encodable

    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {encodable(k): _encodable(v) for k, v in value.items()}
    return value
