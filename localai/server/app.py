"""The ASGI app: routes of both APIs, auth, a body-size limit, and errors as JSON.

Layers, outermost first: WebPageGuard (403 for a foreign Host or a web page's Origin, 415 for
a body that is not application/json) → BearerAuth (401 before anything is read) → BodyLimit
(413) → starlette routing → handlers, which raise APIError for anything the client got wrong.
A client that leaves mid-body is no error; any other exception is a bug: it is logged and
answered with a 500 in the OpenAI error shape, never a traceback.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..engine.remote_http import RemoteError
from . import localai_routes, ollama, openai, residency, tokenizer_routes
from .auth import BearerAuth
from .errors import APIError, render
from .guard import HostNames, WebPageGuard
from .openapi import openapi_document
from .state import ServerState

MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context window
log = logging.getLogger("localai.server")


class BodyLimit:
    """413 for bodies over `limit` bytes, whether announced (Content-Length) or streamed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body is over {self.limit:,} bytes",
                           code="request_too_large")  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            if not length.isdigit():
                too_big = APIError(400, "bad Content-Length header")
            return await render(too_big, scope["path"])(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise too_big
            return msg

        await self.app(scope, counted, send)


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    slot = state.slot
    return JSONResponse({"status": "ok", "model": state.model, "busy": slot.busy,
                         "waiting": slot.waiting, "served": slot.served,
                         "cancelled": slot.cancelled})  # fmt: skip


async def root(request: Request) -> Response:
    return PlainTextResponse("localai is running")


async def openapi(request: Request) -> Response:
    state: ServerState = request.app.state.server
    chat = tuple(n for n in openai.served_models(state) if n != state.embed_model)
    return JSONResponse(openapi_document(chat, (state.embed_model,)))


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return render(exc, request.url.path)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        msg = f"no route {request.method} {request.url.path}; see /openapi.json"
    elif exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}"
    else:
        msg = str(exc.detail)
    err = APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None)
    return render(err, request.url.path)


async def on_remote_error(request: Request, exc: Exception) -> Response:
    """The remote engine's server failed (down, or refused): a gateway's 502, its message."""
    err = APIError(502, str(exc), type="server_error", code="remote_model_server")
    return render(err, request.url.path)


async def on_bug(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return render(err, request.url.path)


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/", root, methods=["GET", "HEAD"]),
    Route("/v1/models", openai.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", openai.get_model, methods=["GET"]),
    Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai.completions, methods=["POST"]),
    Route("/v1/embeddings", openai.embeddings, methods=["POST"]),
    Route("/tokenize", tokenizer_routes.tokenize, methods=["POST"]),
    Route("/apply-template", tokenizer_routes.apply_template, methods=["POST"]),
    Route("/api/chat", ollama.chat, methods=["POST"]),
    Route("/api/generate", ollama.generate, methods=["POST"]),
    Route("/api/embed", ollama.embed, methods=["POST"]),
    Route("/api/embeddings", ollama.embeddings, methods=["POST"]),
    Route("/api/tags", ollama.tags, methods=["GET"]),
    Route("/api/ps", ollama.ps, methods=["GET"]),
    Route("/api/show", ollama.show, methods=["POST"]),
    Route("/api/version", ollama.version, methods=["GET"]),
    Route("/localai/proof", localai_routes.prove, methods=["GET"]),
    Route("/localai/status", localai_routes.status, methods=["GET"]),
    Route("/localai/index", localai_routes.index_status, methods=["GET"]),
    Route("/localai/index", localai_routes.add_source, methods=["POST"]),
    Route("/localai/search", localai_routes.search, methods=["POST"]),
    Route("/localai/stop", residency.stop, methods=["POST"]),
] + [
    Route(f"/api/{verb}", ollama.unsupported_model_route, methods=["POST", "DELETE"])
    for verb in ("pull", "push", "create", "copy", "delete")
]


async def on_disconnect(request: Request, exc: Exception) -> Response:
    """A client that left mid-body (or was cut off for sending too slowly): nobody to answer,
    nothing to log; the empty response is never sent."""
    return Response(status_code=400)


def build_app(state: ServerState, token: str | None, names: HostNames):
    """The whole ASGI app; `token` None turns auth off (loopback only, checked by the daemon);
    `names` are the Host values it answers to (guard.py)."""
    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            APIError: on_api_error,
            HTTPException: on_http_error,
            ClientDisconnect: on_disconnect,
            RemoteError: on_remote_error,
            Exception: on_bug,
        },  # fmt: skip
    )
    app.state.server = state
    return WebPageGuard(BearerAuth(BodyLimit(residency.Activity(app, state)), token), names)
