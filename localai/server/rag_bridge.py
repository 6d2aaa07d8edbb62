"""Answers from the indexed documents over HTTP (the `<model>+docs` alias or `"docs": …`).

The RAG pipeline prepares the prompt on a worker thread (embedding and sqlite) and hands back the
passages it found (Prepared.found()), which the routes send in the stream's first chunk, before
the model has read them: retrieval takes milliseconds, the answer seconds. Generation takes
the same FIFO slot as any request, and when the model is done the citations are checked and the
readable Sources list is streamed as one more delta. The final event is a CitedDone, whose
citations the OpenAI and Ollama routes add to their last chunk or body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio

from ..engine import Delta, Done, Message, SamplingParams
from ..index import IndexError_
from ..rag.answer import DEFAULT_K, CitedDone, NoQuestion
from ..rag.prompt import LAYOUTS
from . import params as P
from .errors import APIError, bad_request
from .state import ServerState


def citations_of(ev) -> dict:
    """The extra fields a RAG answer carries (empty for a plain answer)."""
    if not isinstance(ev, CitedDone):
        return {}
    return {"citations": [c.as_dict() for c in ev.citations], "sources": ev.sources}


async def docs_events(
    state: ServerState, messages: list[Message], params: SamplingParams, body: dict
) -> tuple[dict, AsyncIterator]:
    """(the passages found, the engine events of the answer, ending with a CitedDone)."""
    if state.rag is None:
        raise APIError(400, state.rag_missing, param="model", code="docs_unavailable")
    docs = body.get("docs") if isinstance(body.get("docs"), dict) else {}
    k, source = docs.get("k", DEFAULT_K), docs.get("source")
    layout = LAYOUTS[docs["layout"]] if "layout" in docs else None  # the schema checked the name
    try:
        prep = await anyio.to_thread.run_sync(
            state.rag.prepare, messages, k, source, params.max_tokens, layout
        )
    except NoQuestion as e:
        raise bad_request(str(e), param="messages") from e
    except IndexError_ as e:  # docs.source: an unknown ~user, a NUL
        raise bad_request(str(e), param="docs.source") from e
    engine = state.engine
    tokens = P.prompt_tokens(engine, P.chat_prompt(engine, prep.messages), params)
    inner = state.slot.stream(lambda cancel: engine.generate(tokens, params, cancel))
    return prep.found(), _cited(state, prep, inner)


async def _cited(state: ServerState, prep, inner: AsyncIterator) -> AsyncIterator:
    async with aclosing(inner) as it:
        async for ev in it:
            if not isinstance(ev, Done):
                yield ev
                continue
            done = await anyio.to_thread.run_sync(state.rag.finish, prep, ev.text, ev.stats)
            yield Delta(done.text[len(ev.text) :])
            yield done
