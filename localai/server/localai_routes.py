"""localai's own routes (not part of either compatible API), used by the TUI, `status` and
`search`: GET /localai/status, GET /localai/index, POST /localai/index {"path": ...},
POST /localai/search {"query": ..., "k", "mode", "unit", "under"}, and GET /localai/proof, how
a client checks that the daemon on the port is the one of its home before it sends anything."""

from __future__ import annotations

import re

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from . import params as P
from .auth import proof
from .errors import APIError, bad_request
from .schemas import LOCALAI_SEARCH, validate
from .state import ServerState

ADD_SOURCE = {"type": "object", "required": ["path"],
              "properties": {"path": {"type": "string", "minLength": 1}}}  # fmt: skip


async def prove(request: Request) -> Response:
    """GET /localai/proof?challenge=HEX: the daemon shows it holds this home's token without
    the client sending it (no auth: the client checks the answer before sending anything)."""
    state: ServerState = request.app.state.server
    challenge = request.query_params.get("challenge", "")
    if not re.fullmatch("[0-9a-f]{32,128}", challenge) or not state.proof_key:
        raise bad_request("challenge must be 32 to 128 lowercase hex digits", param="challenge")
    host, port = request.scope["server"]
    return JSONResponse({"proof": proof(state.proof_key, challenge, host, port)})


async def status(request: Request) -> Response:
    state: ServerState = request.app.state.server
    index = state.index
    stats = await anyio.to_thread.run_sync(index.stats) if index is not None else None
    slot, info = state.slot, state.engine.info()
    return JSONResponse({
        "version": __version__, "model": info, "experts": info.get("expert_cache"),
        "memory": state.governor.snapshot() if state.governor else None,
        "residency": _residency(state),
        "slot": {"busy": slot.busy, "waiting": slot.waiting, "served": slot.served,
                 "cancelled": slot.cancelled},
        "index": stats, "docs": state.rag is not None or state.rag_missing,
    })  # fmt: skip


def _residency(state: ServerState) -> dict | None:
    """Whether the model is loaded and until when; the daemon's idle exit (keepalive.py)."""
    model = getattr(state.engine, "residency", None)
    keeper = getattr(state, "keeper", None)
    if model is None:
        return None
    return {"models": [model()], "daemon": keeper.snapshot() if keeper else None}


def _index(state: ServerState):
    if state.index is None:
        raise APIError(400, state.rag_missing, code="docs_unavailable")
    return state.index


async def index_status(request: Request) -> Response:
    index = _index(request.app.state.server)
    state: ServerState = request.app.state.server
    sources = await anyio.to_thread.run_sync(index.sources)
    stats = await anyio.to_thread.run_sync(index.stats)
    progress = state.index_progress() if state.index_progress else None
    return JSONResponse({"sources": sources, "stats": stats, "progress": progress})


async def add_source(request: Request) -> Response:
    """Remember a folder and index it in the background (the watcher then follows it)."""
    state: ServerState = request.app.state.server
    index = _index(state)
    body = validate(ADD_SOURCE, await P.read_json(request))
    try:
        path = await anyio.to_thread.run_sync(index.add_source, body["path"])
    except ValueError as e:  # the index's own "does not exist" message
        raise bad_request(str(e), param="path") from e
    if state.on_source_added is not None:
        state.on_source_added(path)
    return JSONResponse({"added": str(path), "indexing": True})


async def search(request: Request) -> Response:
    """The index's best passages for a query, read back from their files and checked, as
    `localai search --json` prints them: {"hits": [...]}."""
    from ..index import IndexError_
    from ..index.search import hit_row

    index = _index(request.app.state.server)
    body = validate(LOCALAI_SEARCH, await P.read_json(request))

    def run() -> list[dict]:
        k = int(body.get("k", 10))  # JSON Schema's integer admits 132.0
        hits = index.search(body["query"], k=k, mode=body.get("mode", "hybrid"),
                            unit=body.get("unit", "chunk"), under=body.get("under"))  # fmt: skip
        return [hit_row(h, p) for h, p in zip(hits, index.read_many(hits), strict=True)]

    try:
        rows = await anyio.to_thread.run_sync(run)
    except IndexError_ as e:
        raise bad_request(str(e)) from e
    return JSONResponse({"hits": rows})
