"""Running a generation for a request: streamed to the client, or collected whole.

Both paths watch the connection. A streaming response is cancelled by starlette when the client
disconnects; a non-streaming one has nothing to send until the end, so `collect` listens for the
disconnect itself. Either way the slot's generator is closed, which cancels the engine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import anyio
from starlette.requests import Request

from ..engine import Done, EngineError
from .errors import APIError


async def collect(request: Request, events: AsyncIterator) -> Done | None:
    """The Done event of `events`; None if the client went away first."""
    done: Done | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            async with aclosing(events) as it:
                async for ev in it:
                    if isinstance(ev, Done):
                        done = ev
        except Exception as e:  # re-raised below, outside the task group (no ExceptionGroup)
            error = e
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return done


async def framed(
    events: AsyncIterator,
    render: Callable[[object], list[dict]],
    on_error: Callable[[APIError], dict],
    sse: bool,
    head: list[dict] = (),
) -> AsyncIterator[bytes]:
    """Encode each event as SSE (`data: …`, ending `data: [DONE]`) or NDJSON lines.

    `render(event)` returns the JSON objects to send for one engine event. An error after the
    response started cannot change the status code, so it is sent in-band as the last object."""

    def line(obj: dict) -> bytes:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return f"data: {text}\n\n".encode() if sse else (text + "\n").encode()

    for obj in head:
        yield line(obj)
    async with aclosing(events) as it:
        try:
            async for ev in it:
                for obj in render(ev):
                    yield line(obj)
        except APIError as e:
            yield line(on_error(e))
        except EngineError as e:
            yield line(on_error(APIError(400, str(e))))
    if sse:
        yield b"data: [DONE]\n\n"


SSE_MEDIA = "text/event-stream"
NDJSON_MEDIA = "application/x-ndjson"
