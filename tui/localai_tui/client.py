"""The daemon's HTTP API as the TUI uses it: OpenAI-style streaming chat (with localai's `stats`
and `citations` extensions), model list, and localai status/index routes where the daemon has
them. Every failure becomes a ClientError whose message can be shown to a person as it is."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


class ClientError(RuntimeError):
    pass


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    stats: dict = field(default_factory=dict)
    citations: list[dict] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # what retrieval used and dropped (docs answers)
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI entries, arguments as JSON text


@dataclass
class Reading:
    """An answer from documents has begun: the passages the model reads (`sources`, with
    `passages`), sent by the daemon before the answer's first word."""

    sources: dict


class DaemonClient:
    def __init__(self, base_url: str, token: str):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, read=None),  # answers may take long; connects may not
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def _get(self, path: str) -> dict | None:
        """JSON of GET `path`; None when this daemon does not have the route."""
        try:
            r = await self.http.get(path)
        except httpx.HTTPError as e:
            raise ClientError(f"daemon at {self.base_url} is not answering ({e})") from e
        if r.status_code == 404:
            return None
        _raise_for(r.status_code, r.content)
        return r.json()

    async def health(self) -> dict:
        return await self._get("/health") or {}

    async def models(self) -> list[str]:
        data = await self._get("/v1/models") or {"data": []}
        return [m["id"] for m in data["data"]]

    async def ps(self) -> dict | None:
        return await self._get("/api/ps")

    async def status(self) -> dict | None:
        return await self._get("/localai/status")

    async def index(self) -> dict | None:
        return await self._get("/localai/index")

    async def add_source(self, path: str) -> dict:
        try:
            r = await self.http.post("/localai/index", json={"path": path})
        except httpx.HTTPError as e:
            raise ClientError(f"daemon at {self.base_url} is not answering ({e})") from e
        if r.status_code == 404:
            raise ClientError("this daemon cannot add folders to the index")
        _raise_for(r.status_code, r.content)
        return r.json()

    async def capabilities(self, model: str) -> list[str]:
        """What the model does, in Ollama's words ("completion", "tools"); [] when unknown."""
        try:
            r = await self.http.post("/api/show", json={"model": model})
        except httpx.HTTPError as e:
            raise ClientError(f"daemon at {self.base_url} is not answering ({e})") from e
        return r.json().get("capabilities", []) if r.status_code == 200 else []

    async def chat(
        self, model: str, messages: list[dict], **params
    ) -> AsyncIterator[str | Reading | Answer]:
        """Yield text deltas, then one Answer with the whole text, stats and citations; an
        answer from documents yields Reading first."""
        body = {"model": model, "messages": messages, "stream": True, "stats": True, **params}
        answer = Answer()
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    _raise_for(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is None:
                        continue
                    if chunk == "[DONE]":
                        break
                    delta = _absorb(answer, chunk)
                    if "passages" in answer.sources and not answer.text:
                        yield Reading(answer.sources)  # the first chunk of a docs answer
                        answer.sources = {}  # the last chunk brings the summary again
                    if delta:
                        answer.text += delta
                        yield delta
        except httpx.HTTPError as e:
            raise ClientError(f"lost the daemon mid-answer ({e})") from e
        yield answer


def _sse_data(line: str):
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return data if data == "[DONE]" else json.loads(data)


def _absorb(answer: Answer, chunk: dict) -> str:
    """Fold one stream chunk's extras into `answer`; return its text delta."""
    if "error" in chunk:
        raise ClientError(chunk["error"].get("message", str(chunk["error"])))
    answer.stats = chunk.get("stats") or answer.stats
    answer.citations = chunk.get("citations") or answer.citations
    answer.sources = chunk.get("sources") or answer.sources
    choices = chunk.get("choices") or [{}]
    answer.finish_reason = choices[0].get("finish_reason") or answer.finish_reason
    delta = choices[0].get("delta") or {}
    answer.tool_calls += [
        {k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls") or []
    ]
    return delta.get("content") or ""


def _raise_for(status: int, content: bytes) -> None:
    if status < 400:
        return
    try:
        msg = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = content.decode("utf-8", "replace")[:300]
    if status == 401:
        msg = f"the daemon refused our token: {msg}"
    raise ClientError(msg)
