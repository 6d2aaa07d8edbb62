"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Response bodies follow the OpenAI OpenAPI schemas (tests validate them); streaming uses SSE with
one `id` per response, a first chat chunk carrying the role, a last chunk carrying
`finish_reason`, an optional usage chunk (`stream_options.include_usage`), then `[DONE]`.
"""

from __future__ import annotations

import base64
import time
import uuid

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..engine import Delta, Done
from . import params as P
from . import residency
from .errors import APIError, bad_request, model_not_found
from .rag_bridge import citations_of, docs_events
from .schemas import CHAT_COMPLETION, COMPLETION, EMBEDDING, validate
from .state import ServerState
from .stream import SSE_MEDIA, collect, framed
from .tool_bridge import names_of, offered, with_tool_calls

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions


def _finish(done: Done) -> str:
    if getattr(done, "calls", None):
        return "tool_calls"
    return "length" if done.stats.finish_reason == "length" else "stop"


def _usage(done: Done) -> dict:
    s = done.stats
    total = s.prompt_tokens + s.completion_tokens
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}  # fmt: skip


def _stats_of(done: Done) -> dict:
    return {"stats": done.stats.as_dict()}


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "localai"}


def served_models(state: ServerState) -> list[str]:
    names = [state.model]
    if state.rag is not None:
        names.append(state.model + P.DOCS_SUFFIX)
    return names + [state.embed_model]


def _cards(state: ServerState) -> list[dict]:
    """The served models; chat models say their context length (as vLLM's `max_model_len`
    and llama-server's `meta` do), so that remote clients can check prompts against it."""
    created, ctx = int(state.started_at), state.engine.context_length
    return [_model_card(n, created) | ({} if n == state.embed_model else {"context_length": ctx})
            for n in served_models(state)]  # fmt: skip


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    data = _cards(state)
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    name = request.path_params["model"]
    if name not in served_models(state):
        raise model_not_found(name, served_models(state))
    return JSONResponse(next(c for c in _cards(state) if c["id"] == name))


def _sampling(body: dict, default_max: int | None):
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
    keys = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty")
    return P.sampling(max_tokens=max_tokens, **{k: body.get(k) for k in keys})


def _include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(CHAT_COMPLETION, await P.read_json(request))
    target = P.resolve_model(state.engine, body["model"], body.get("docs"))
    await residency.ready(state, body)
    msgs = P.to_messages(body["messages"])
    params = _sampling(body, None)
    tools, prefix = offered(body)
    if target.docs and tools:
        raise bad_request("answers from documents do not call tools; send one or the other",
                          param="tools")  # fmt: skip
    found = None  # answers from documents: the passages, sent before the answer
    if target.docs:
        found, events = await docs_events(state, msgs, params, body)
    else:
        prompt = P.chat_prompt(state.engine, msgs, tools) + prefix
        tokens = P.prompt_tokens(state.engine, prompt, params)
        events = state.slot.stream(lambda cancel: state.engine.generate(tokens, params, cancel))
        if tools:
            events = with_tool_calls(events, prefix, names_of(tools))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = body["model"] if target.docs else state.model

    def extra(done: Done) -> dict:
        return (_stats_of(done) if body.get("stats") else {}) | citations_of(done)

    if body.get("stream"):
        first = {"sources": found} if found is not None else {}
        return chat_stream(events, rid, created, model, _include_usage(body), extra, first)
    done = await collect(request, events)
    if done is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    return JSONResponse(chat_body(done, rid, created, model, extra(done)))


def chat_body(done: Done, rid: str, created: int, model: str, extra: dict | None = None) -> dict:
    message = {"role": "assistant", "content": done.text, "refusal": None}
    calls = getattr(done, "calls", None)
    if calls:
        message["content"] = done.text or None
        message["tool_calls"] = [c.openai() for c in calls]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(done)}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": _usage(done), **(extra or {})}  # fmt: skip


def chat_stream(events, rid, created, model, include_usage, extra_last=None,
                extra_first=None) -> Response:  # fmt: skip
    def chunk(delta: dict, finish: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [choice]}  # fmt: skip

    def render(ev) -> list[dict]:
        if isinstance(ev, Delta):
            return [chunk({"content": ev.text}, None)]
        if isinstance(ev, Done):
            calls = getattr(ev, "calls", None) or []
            tail = [chunk({"tool_calls": [c.openai(i) for i, c in enumerate(calls)]}, None)]
            tail = tail if calls else []
            tail.append(chunk({}, _finish(ev)) | (extra_last(ev) if extra_last else {}))
            if include_usage:
                tail.append({**chunk({}, None), "choices": [], "usage": _usage(ev)})
            return tail
        return []

    head = [chunk({"role": "assistant", "content": ""}, None) | (extra_first or {})]
    body = framed(events, render, lambda e: e.openai_body(), sse=True, head=head)
    return StreamingResponse(body, media_type=SSE_MEDIA)


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(COMPLETION, await P.read_json(request))
    target = P.resolve_model(state.engine, body["model"], body.get("docs"))
    if target.docs:
        raise bad_request("answers from documents are served on /v1/chat/completions", "model")
    await residency.ready(state, body)
    prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
    params = _sampling(body, COMPLETION_DEFAULT_MAX_TOKENS)
    text = P.completion_prompt(state.engine, prompt, body.get("suffix"))
    P.add_fim_stops(params, body.get("suffix"))
    tokens = P.prompt_tokens(state.engine, text, params, param="prompt")
    events = state.slot.stream(lambda cancel: state.engine.generate(tokens, params, cancel))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt if body.get("echo") else ""

    def card(text: str, finish: str | None, done: Done | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out = {"id": rid, "object": "text_completion", "created": created,
               "model": state.model, "choices": [choice]}  # fmt: skip
        return out | ({"usage": _usage(done)} if done else {})

    if body.get("stream"):

        def render(ev) -> list[dict]:
            if isinstance(ev, Delta):
                return [card(ev.text, None)]
            if isinstance(ev, Done):
                return [card("", _finish(ev), ev) | (_stats_of(ev) if body.get("stats") else {})]
            return []

        head = [card(echo, None)] if echo else []
        stream = framed(events, render, lambda e: e.openai_body(), sse=True, head=head)
        return StreamingResponse(stream, media_type=SSE_MEDIA)
    done = await collect(request, events)
    if done is None:
        return Response(status_code=499)
    stats = _stats_of(done) if body.get("stats") else {}
    return JSONResponse(card(echo + done.text, _finish(done), done) | stats)


async def embed_texts(state: ServerState, model: object, texts: list[str]):
    """(vectors (N, D), token count) for `texts` with the embedding model."""
    name = str(model).removesuffix(":latest")
    if name != state.embed_model:
        raise model_not_found(model, [state.embed_model])
    try:
        embedder = await state.embedder()
    except (OSError, RuntimeError) as e:  # not installed and cannot be pulled, or damaged
        msg = f"the embedding model {state.embed_model} could not be loaded: {e}"
        raise APIError(503, msg, type="server_error", code="embedder_unavailable") from e
    vectors = await anyio.to_thread.run_sync(embedder.embed, texts)
    n_tokens = sum(embedder.count_tokens(t) for t in texts)
    return vectors, n_tokens


async def embeddings(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(EMBEDDING, await P.read_json(request))
    texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
    vectors, n_tokens = await embed_texts(state, body["model"], texts)
    dims = body.get("dimensions")
    if dims is not None and dims != vectors.shape[1]:
        raise APIError(400, f"{state.embed_model} makes {vectors.shape[1]}-d vectors, not {dims}",
                       param="dimensions")  # fmt: skip
    b64 = body.get("encoding_format") == "base64"

    def encode(v: np.ndarray):
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encode(v)}
            for i, v in enumerate(vectors)]  # fmt: skip
    usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    return JSONResponse({"object": "list", "data": data, "model": state.embed_model,
                         "usage": usage})  # fmt: skip
