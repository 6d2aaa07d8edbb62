"""Answers from the indexed documents over HTTP (the `<model>+docs` alias or `"docs": true`).

Until the RAG pipeline is wired in (state.rag is None), such requests get a clear 400 that says
so, rather than a plain answer that silently ignores the documents.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..engine import Message, SamplingParams
from .errors import APIError
from .state import ServerState


async def answer_with_docs(
    request: Request,
    state: ServerState,
    messages: list[Message],
    params: SamplingParams,
    body: dict,
    dialect: str,
) -> Response:
    if state.rag is None:
        raise APIError(400, state.rag_missing, param="model", code="docs_unavailable")
    raise APIError(400, "answers from documents are not wired into the server yet",
                   param="model", code="docs_unavailable")  # fmt: skip
