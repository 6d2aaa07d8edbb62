"""A small client of a running daemon, for CLI commands that need the model or the index.

When `localai serve` runs, `localai run` sends its request there instead of loading a second
copy of the model, and `localai search` asks the daemon's index (whose embedder is loaded)
instead of paying ~1-2 s to start one. The daemon is used only when it is ours and, for
generation, serves the model asked for; otherwise callers fall back to running in-process.
Standard library only (http.client), so the CLI does not pay for an HTTP stack it rarely needs.

Whatever listens on the configured port may not be our daemon: another user can take the port
first and wait for our token and queries. So every connection starts with a challenge that
sends nothing of ours: GET /localai/proof with 32 fresh random bytes, answered by HMAC(token,
challenge, the address reached) (server/auth.proof). Only a process that can read this home's
token (mode 0600) can answer; an answer relayed from a daemon on another port does not match.
The token and the request follow on that same connection, which is never reopened unchecked.
This keeps one TCP port for every client (editors, Ollama and OpenAI clients need one) where a
per-home Unix socket would need a second listener, and it holds across users on one machine.
"""

from __future__ import annotations

import dataclasses
import hmac
import http.client
import json
import re
import secrets
from collections.abc import Iterator

from .config import Settings
from .engine import Delta, Done, EngineError, GenerationStats, Message, SamplingParams
from .engine.remote_prompt import CallCollector, openai_messages
from .server.auth import PROOF_PATH, proof, read_token

PROBE_TIMEOUT_S = 0.5


class NotOurDaemon(Exception):
    """Something answers on the daemon's port but could not prove it holds this home's token;
    nothing of ours was sent to it."""


def verified_connection(host: str, port: int, token: str,
                        timeout: float | None) -> http.client.HTTPConnection:  # fmt: skip
    """A connection to host:port whose server has proven it holds `token` (see the module's
    docstring); raises NotOurDaemon, or OSError when nothing listens there."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        peer_host, peer_port = conn.sock.getpeername()[:2]
        challenge = secrets.token_hex(32)
        conn.request("GET", f"{PROOF_PATH}?challenge={challenge}")
        resp = conn.getresponse()
        got = _proof_of(resp.status, resp.read())
        expected = proof(token, challenge, peer_host, peer_port)
        if conn.sock is None or not hmac.compare_digest(got, expected):
            raise NotOurDaemon(
                f"something is listening on {host}:{port}, but it is not localai's daemon for "
                "this home (it could not prove it holds the token); nothing was sent to it"
            )
    except BaseException:
        conn.close()
        raise
    conn.auto_open = 0  # a dropped connection is an error, never silently reopened unchecked
    return conn


def _proof_of(status: int, raw: bytes) -> str:
    try:
        got = json.loads(raw)["proof"] if status == 200 else ""
    except (ValueError, KeyError, TypeError):
        return ""
    return got if isinstance(got, str) and re.fullmatch("[0-9a-f]{64}", got) else ""


class Daemon:
    def __init__(self, host: str, port: int, token: str, model: str):
        self.host, self.port, self.token, self.model = host, port, token, model

    @classmethod
    def find(cls, settings: Settings) -> Daemon | None:
        """The daemon of this home on the configured host/port, or None when none answers;
        raises NotOurDaemon when something else holds the port."""
        token = read_token(settings.home)
        if token is None:
            return None
        d = cls(settings.host, settings.port, token, "")
        try:
            status, health = d._get("/health")
        except (OSError, ValueError, http.client.HTTPException):
            return None
        if status != 200:
            return None
        d.model = health.get("model", "")
        return d

    def _conn(self, timeout: float | None) -> http.client.HTTPConnection:
        return verified_connection(self.host, self.port, self.token, timeout)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def _get(self, path: str) -> tuple[int, dict]:
        conn = self._conn(PROBE_TIMEOUT_S)
        try:
            conn.request("GET", path, headers=self._headers())
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def supports_tools(self) -> bool:
        """Whether the served model's template has a place for tools (its capabilities)."""
        status, shown = self.call("POST", "/api/show", {"model": self.model})
        return status == 200 and "tools" in shown.get("capabilities", [])

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = PROBE_TIMEOUT_S * 20) -> tuple[int, dict]:  # fmt: skip
        """(status, JSON body) of one request to a localai or Ollama route."""
        conn = self._conn(timeout)
        try:
            data = json.dumps(body) if body is not None else None
            conn.request(method, path, data, headers=self._headers())
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def generate(
        self,
        messages: list[Message] | None,
        prompt: str | None,
        params: SamplingParams,
        docs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> Iterator[Delta | Done]:
        """Stream a chat turn (`messages`) or a raw completion (`prompt`) as engine events;
        errors the server reports (e.g. context overflow) are raised as EngineError. With
        `docs` ({"k", "source", "layout"}) the answer comes from the documents and ends in a
        CitedDone. With `tools` (OpenAI function entries) the calls the model makes come last,
        as the tagged blocks the engines write (for toolcall.Splitter, as the remote engine)."""
        body: dict = {"model": self.model, "stream": True, "stats": True, "docs": docs,
                      "temperature": params.temperature, "top_p": params.top_p,
                      "top_k": params.top_k, "min_p": params.min_p, "seed": params.seed,
                      "max_tokens": params.max_tokens, "stop": params.stop,
                      "repeat_penalty": params.repeat_penalty}  # fmt: skip
        if messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = openai_messages(messages)
            if tools:
                body["tools"] = tools
        else:
            path, body["prompt"] = "/v1/completions", prompt
        conn = self._conn(PROBE_TIMEOUT_S * 10)
        try:
            conn.request("POST", path, json.dumps(body), headers=self._headers())
            conn.sock.settimeout(None)  # a long answer is not a dead daemon
            resp = conn.getresponse()
            if resp.status != 200:
                raise EngineError(_error_message(resp.read()))
            yield from _events(resp)
        finally:
            conn.close()  # an early close cancels the generation on the server

    def search(self, body: dict) -> list[dict]:
        """POST /localai/search: the daemon's index answers (its embedder is already loaded).
        Raises EngineError with the server's message when it cannot (e.g. it has no index)."""
        conn = self._conn(PROBE_TIMEOUT_S * 60)
        try:
            conn.request("POST", "/localai/search", json.dumps(body), headers=self._headers())
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise EngineError(_error_message(raw))
        return json.loads(raw)["hits"]


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500]


def _stats(flat: dict) -> GenerationStats:
    """GenerationStats from its as_dict(): the fields, and the rest (what only some engines
    measure, flattened there) back into `extra`."""
    names = {f.name for f in dataclasses.fields(GenerationStats)} - {"extra"}
    known = {k: v for k, v in flat.items() if k in names}
    return GenerationStats(**known, extra={k: v for k, v in flat.items() if k not in names})


def _events(resp) -> Iterator:
    """Delta, then Done (a CitedDone for documents, which first yield Found)."""
    text, calls = [], CallCollector()
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            raise EngineError(_error_message(line[6:].encode()))
        if isinstance(obj.get("sources"), dict) and "passages" in obj["sources"]:
            from .rag.answer import Found

            yield Found(obj["sources"])  # the first chunk of an answer from documents
        if not obj.get("choices"):
            continue
        choice = obj["choices"][0]
        delta = choice.get("delta", {})
        piece = delta.get("content") or choice.get("text") or ""
        if piece:
            text.append(piece)
            yield Delta(piece)
        calls.add(delta.get("tool_calls"))
        if choice.get("finish_reason") is not None:
            stats = _stats(obj.get("stats", {}))
            if "citations" not in obj:
                called = calls.text() if calls.calls else ""
                if called:
                    yield Delta(called)
                yield Done("".join(text) + called, stats)
                return
            from .rag.answer import CitedDone
            from .rag.cite import Citation

            cits = [Citation.from_dict(c) for c in obj["citations"]]
            # the Sources list arrives as the last delta, after the model's own text
            yield CitedDone("".join(text), stats, cits, obj.get("sources", {}), "".join(text[:-1]))
            return
    raise EngineError("the daemon closed the stream before the answer ended")
