"""The tokenizer routes llama.cpp's llama-server has, in its shapes, so that a client counting
tokens for a remote model (localai's remote engine, engine/remote.py) counts them as this daemon
will: POST /tokenize {"content", "add_special"} → {"tokens"}, and POST /apply-template
{"messages", "tools"} → {"prompt", "tokens"}: the chat as the model's own template renders it,
and (beyond llama-server's answer) its tokens, so a client counts a chat in one round trip.

`add_special` (default true) both parses control tokens and adds BOS where the model wants one:
localai's tokenizer takes the two together (Engine.tokenize's `special`)."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import params as P
from . import residency
from .schemas import APPLY_TEMPLATE, TOKENIZE, validate
from .state import ServerState


async def tokenize(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(TOKENIZE, await P.read_json(request))
    await _loaded(state)
    special = body.get("add_special")
    tokens = state.engine.tokenize(body["content"], special=special is not False)
    return JSONResponse({"tokens": list(tokens)})


async def apply_template(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = validate(APPLY_TEMPLATE, await P.read_json(request))
    await _loaded(state)
    prompt = P.chat_prompt(state.engine, P.to_messages(body["messages"]), body.get("tools"))
    return JSONResponse({"prompt": str(prompt), "tokens": list(state.engine.tokenize(prompt))})


async def _loaded(state: ServerState) -> None:
    """Load the model if it was unloaded; unlike a generation, counting tokens leaves the
    session's keep_alive as it is."""
    model = residency.resident(state)
    if model is not None:
        await anyio.to_thread.run_sync(model.ensure)
