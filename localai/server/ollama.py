"""Ollama-compatible routes: /api/chat, /api/generate, /api/embed(dings), /api/tags, /api/ps,
/api/show, /api/version.

Ollama streams by default (NDJSON, one object a line, the last with `done: true` and the timing
counters in nanoseconds); errors are `{"error": "..."}`. An empty chat or generate request loads
the model (`done_reason: "load"`), or with `keep_alive: 0` unloads it (`"unload"`: how `ollama
stop` asks); `keep_alive` on any request sets how long the model stays loaded (residency.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..engine import Delta, Done, Message
from . import params as P
from . import residency
from .errors import APIError, bad_request, model_not_found
from .openai import embed_texts
from .rag_bridge import citations_of, docs_events
from .schemas import (
    OLLAMA_CHAT,
    OLLAMA_EMBED,
    OLLAMA_EMBEDDINGS,
    OLLAMA_GENERATE,
    OLLAMA_SHOW,
    validate,
)
from .state import ServerState
from .stream import NDJSON_MEDIA, collect, framed
from .tool_bridge import names_of, with_tool_calls

NS = 1_000_000_000


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _sampling(body: dict):
    o = body.get("options") or {}
    n = o.get("num_predict")
    max_tokens = n if isinstance(n, int) and n > 0 else None  # -1, -2: until the context ends
    keys = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty")
    return P.sampling(max_tokens=max_tokens, **{k: o.get(k) for k in keys})


def _done_fields(done: Done) -> dict:
    s = done.stats
    return {
        "done": True,
        "done_reason": "length" if s.finish_reason == "length" else "stop",
        "total_duration": int((s.total_s + s.load_s) * NS),
        "load_duration": int(s.load_s * NS),
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": int(s.ttft_s * NS),
        "eval_count": s.completion_tokens,
        "eval_duration": int(max(s.total_s - s.ttft_s, 0) * NS),
    }


def _refuse_unsupported(body: dict) -> None:
    if body.get("format") not in (None, ""):
        raise bad_request("`format` (structured output) is not supported by this server")
    if body.get("images"):
        raise bad_request("images are not supported: the loaded model reads text only")


async def _respond(request, state: ServerState, events, stream: bool, piece,
                   found: dict | None = None) -> Response:  # fmt: skip
    """Stream NDJSON (`piece(text)` per delta, then `piece("", done)` with the done fields) or
    return one object. An answer from documents streams the passages `found` first, in a line
    with no text."""
    base = {"model": state.model}

    def render(ev) -> list[dict]:
        if isinstance(ev, Delta):
            return [base | {"created_at": _now()} | piece(ev.text) | {"done": False}]
        if isinstance(ev, Done):
            last = piece("", ev) | _done_fields(ev) | citations_of(ev)
            return [base | {"created_at": _now()} | last]
        return []

    if stream:
        head = (
            []
            if found is None
            else [base | {"created_at": _now()} | piece("") | {"done": False, "sources": found}]
        )
        body = framed(events, render, lambda e: {"error": e.message}, sse=False, head=head)
        return StreamingResponse(body, media_type=NDJSON_MEDIA)
    done = await collect(request, events)
    if done is None:
        return Response(status_code=499)
    final = piece(done.text, done) | _done_fields(done) | citations_of(done)
    return JSONResponse(base | {"created_at": _now()} | final)


async def _load_or_unload(state: ServerState, body: dict, piece: dict) -> Response:
    """A request with nothing to generate: Ollama's "load the model", or with keep_alive 0 its
    "unload it" (`ollama stop`)."""
    if residency.wants_unload(body):
        await residency.unload_now(state)
        reason, load_s = "unload", 0.0
    else:
        reason, load_s = "load", await residency.ready(state, body)
    return JSONResponse({"model": state.model, "created_at": _now(), **piece, "done": True,
                         "done_reason": reason, "load_duration": int(load_s * NS)})  # fmt: skip


async def chat(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(OLLAMA_CHAT, await P.read_json(request))
    target = P.resolve_model(state.engine, body["model"], body.get("docs"))
    _refuse_unsupported(body)
    msgs = P.to_messages(body.get("messages") or [])
    if not msgs:
        return await _load_or_unload(state, body, {"message": {"role": "assistant", "content": ""}})
    await residency.ready(state, body)
    params = _sampling(body)
    stream = body.get("stream") is not False
    tools = body.get("tools") or None
    if target.docs and tools:
        raise bad_request("answers from documents do not call tools; send one or the other")
    found = None
    if target.docs:
        found, events = await docs_events(state, msgs, params, body)
    else:
        prompt = P.chat_prompt(state.engine, msgs, tools)
        tokens = P.prompt_tokens(state.engine, prompt, params)
        events = state.slot.stream(lambda cancel: state.engine.generate(tokens, params, cancel))
        if tools:
            events = with_tool_calls(events, "", names_of(tools))

    def piece(text: str, done: Done | None = None) -> dict:
        message = {"role": "assistant", "content": text}
        calls = getattr(done, "calls", None)
        if calls:
            message["tool_calls"] = [c.ollama() for c in calls]
        return {"message": message}

    return await _respond(request, state, events, stream, piece, found)


async def generate(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(OLLAMA_GENERATE, await P.read_json(request))
    target = P.resolve_model(state.engine, body["model"], body.get("docs"))
    _refuse_unsupported(body)
    if target.docs:
        raise bad_request("answers from documents are served on /api/chat", "model")
    prompt, suffix = body.get("prompt") or "", body.get("suffix")
    if not prompt and not suffix:
        return await _load_or_unload(state, body, {"response": ""})
    await residency.ready(state, body)
    params = _sampling(body)
    if suffix:
        text = P.completion_prompt(state.engine, prompt, suffix)
        P.add_fim_stops(params, suffix)
    elif body.get("raw"):
        text = prompt
    else:
        system = [Message("system", body["system"])] if body.get("system") else []
        text = P.chat_prompt(state.engine, system + [Message("user", prompt)])
    tokens = P.prompt_tokens(state.engine, text, params, param="prompt")
    events = state.slot.stream(lambda cancel: state.engine.generate(tokens, params, cancel))
    stream = body.get("stream") is not False
    return await _respond(request, state, events, stream, lambda t, done=None: {"response": t})


async def embed(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(OLLAMA_EMBED, await P.read_json(request))
    texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
    t0 = time.perf_counter()
    vectors, n_tokens = await embed_texts(state, body["model"], texts)
    return JSONResponse({"model": state.embed_model, "embeddings": vectors.tolist(),
                         "total_duration": int((time.perf_counter() - t0) * NS),
                         "load_duration": 0, "prompt_eval_count": n_tokens})  # fmt: skip


async def embeddings(request: Request) -> Response:
    """The older single-text embedding route some clients still call."""
    state: ServerState = request.app.state.server
    body = validate(OLLAMA_EMBEDDINGS, await P.read_json(request))
    vectors, _ = await embed_texts(state, body["model"], [body["prompt"]])
    return JSONResponse({"embedding": vectors[0].tolist()})


def _card(state: ServerState, name: str) -> dict:
    meta = state.model_meta.get(name, {})
    return {"name": name, "model": name, "modified_at": meta.get("modified_at", _now()),
            "size": meta.get("size", 0), "digest": meta.get("digest", ""),
            "details": meta.get("details", {})}  # fmt: skip


async def tags(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"models": [_card(state, n) for n in (state.model, state.embed_model)]})


async def ps(request: Request) -> Response:
    """Loaded models, their bytes and when each unloads (empty after an idle unload)."""
    state: ServerState = request.app.state.server
    return JSONResponse({"models": residency.ps_entries(state, _card(state, state.model))})


def _capabilities(state: ServerState) -> list[str]:
    """Ollama's names for what the chat model does; "tools" when its template takes tools."""
    return ["completion"] + (["tools"] if state.engine.supports_tools() else [])


async def show(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(OLLAMA_SHOW, await P.read_json(request))
    name = str(body.get("model") or body.get("name")).removesuffix(":latest")
    if name not in (state.model, state.embed_model):
        raise model_not_found(name, [state.model, state.embed_model])
    card = _card(state, name)
    is_chat = name == state.model
    info = state.engine.info() if is_chat else {}
    model_info = {"general.architecture": info.get("arch", "bert")}
    if is_chat:
        model_info[f"{info.get('arch')}.context_length"] = state.engine.context_length
    return JSONResponse({
        "modelfile": f"FROM {info.get('path', name)}\n", "parameters": "", "template": "",
        "details": card["details"], "model_info": model_info, "modified_at": card["modified_at"],
        "capabilities": _capabilities(state) if is_chat else ["embedding"],
    })  # fmt: skip


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def unsupported_model_route(request: Request) -> Response:
    """pull/push/create/copy/delete manage Ollama's own model store, which this server lacks."""
    raise APIError(
        400,
        f"{request.url.path} is not supported: models are managed with `localai models …`",
    )
