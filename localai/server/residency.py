"""The server's side of memory that gives itself back (keepalive.py): which requests keep the
model loaded, `keep_alive` on requests, unloading on request, `/api/ps`, `POST /localai/stop`,
and the keeper thread that unloads idle models and ends an idle daemon.

`Activity` (ASGI middleware, inside auth so that only this home's clients count) brackets every
request that uses the chat model with `begin`/`end`, from arrival to the last byte sent, so a
streaming answer holds the model until it is out; any other authenticated request (the TUI's
status polls) only keeps the daemon itself alive. /health and the proof route keep nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..durations import describe, parse_duration
from ..engine import EngineError
from ..keepalive import ResidentEngine
from .auth import OPEN_PATHS
from .errors import APIError, bad_request
from .state import ServerState

MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate",
                         "/tokenize", "/apply-template"})  # fmt: skip
TICK_S = 0.25  # how often the keeper looks at the countdowns
FOREVER_AT = "2999-01-01T00:00:00Z"  # `expires_at` of a model kept forever
FOREVER_TS = datetime(2999, 1, 1, tzinfo=UTC).timestamp()


def resident(state: ServerState) -> ResidentEngine | None:
    return state.engine if isinstance(state.engine, ResidentEngine) else None


class Activity:
    """ASGI middleware: counts requests in flight (see the module's docstring)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        keeper: Keeper | None = getattr(self.state, "keeper", None)
        if scope["type"] != "http" or keeper is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        model = resident(self.state) if scope["path"] in MODEL_PATHS else None
        keeper.arrive()
        if model is not None:
            model.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            keeper.leave()
            if model is not None and model.end():  # keep_alive 0: unload once all are out
                await anyio.to_thread.run_sync(model.unload, "keep_alive 0")


def keep_alive_of(body: dict) -> tuple[float | None, bool]:
    """(seconds or None for forever, whether the request gave one); 400 for a bad value."""
    if body.get("keep_alive") is None:
        return None, False
    try:
        return parse_duration(body["keep_alive"]), True
    except ValueError as e:
        raise bad_request(f"keep_alive: {e}", param="keep_alive") from e


async def ready(state: ServerState, body: dict) -> float:
    """Take the request's keep_alive and make sure the model is loaded (on a worker thread, so
    other requests keep streaming while it loads); the seconds loading took."""
    model = resident(state)
    if model is None:
        return 0.0
    seconds, given = keep_alive_of(body)
    model.request_keep_alive(seconds, given)
    try:
        return await anyio.to_thread.run_sync(model.ensure)
    except (EngineError, OSError, MemoryError) as e:  # file gone, over the RAM budget
        raise APIError(503, f"the model {model.name} could not be loaded again: {e}",
                       type="server_error", code="model_unavailable") from e  # fmt: skip


def wants_unload(body: dict) -> bool:
    """Ollama's way to unload a model: a request with nothing to do and keep_alive 0."""
    seconds, given = keep_alive_of(body)
    return given and seconds == 0


async def unload_now(state: ServerState) -> bool:
    """Unload at once unless other requests are in flight (then as soon as they are done:
    this request set keep_alive 0); True if it is unloaded now."""
    model = resident(state)
    if model is None:
        return False
    model.request_keep_alive(0.0, True)
    return await anyio.to_thread.run_sync(model.unload, "asked to stop", 1)


def _iso(t: float | None) -> str:
    if t is None or t >= FOREVER_TS:  # keep_alive: -1, or so long it may as well be
        return FOREVER_AT
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def ps_entries(state: ServerState, card: dict) -> list[dict]:
    """`/api/ps`'s models: the chat model while it is loaded, with its bytes and expiry."""
    model = resident(state)
    if model is not None and not model.loaded:
        return []
    res = model.residency() if model is not None else {"expires_at": None}
    expires = _iso(res["expires_at"])
    size = res.get("bytes") or card.get("size", 0)
    return [card | {"size": size, "expires_at": expires, "size_vram": 0,
                    "context_length": state.engine.context_length,
                    "localai": res}]  # fmt: skip


async def stop(request: Request) -> Response:
    """POST /localai/stop: the daemon exits (as on SIGTERM: running answers end at once)."""
    state: ServerState = request.app.state.server
    keeper: Keeper | None = getattr(state, "keeper", None)
    if keeper is None or keeper.request_exit is None:
        raise bad_request("this daemon cannot be stopped over HTTP; send it SIGTERM")
    keeper.log("stopping: asked by `localai stop`")
    keeper.request_exit()
    return JSONResponse({"stopping": True, "pid": os.getpid()})


class Keeper:
    """The background thread: unloads a model whose countdown ran out, and ends the daemon
    after `idle_exit_s` with no request at all (only for a daemon the TUI started)."""

    def __init__(self, model: ResidentEngine | None, idle_exit_s: float | None,
                 request_exit: Callable[[], None] | None, log=print):  # fmt: skip
        self.model, self.idle_exit_s = model, idle_exit_s
        self.request_exit, self.log = request_exit, log
        self.active = 0
        self.last_request = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def arrive(self) -> None:
        with self._lock:
            self.active += 1
            self.last_request = time.monotonic()

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            self.last_request = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self.active else time.monotonic() - self.last_request

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="keep-alive")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                if self.model is not None:
                    self.model.tick()
                idle = self.idle_exit_s is not None and self.idle_for() >= self.idle_exit_s
                if idle and self.request_exit is not None:
                    self.log(f"no requests for {describe(self.idle_exit_s)}: exiting")
                    self.request_exit()
                    return
            except Exception as e:  # noqa: BLE001  (logged; the next tick tries again)
                self.log(f"keep-alive: {e}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def snapshot(self) -> dict:
        return {"idle_exit_s": self.idle_exit_s, "idle_for_s": round(self.idle_for(), 1)}
