"""HTTP to an OpenAI-compatible model server, for the remote engine (remote.py).

One httpx client per engine. Every failure becomes an EngineError that names the server's URL,
the HTTP status and the server's own message, so a user can tell a wrong key from a server that
is down. Retries happen only where a request cannot have had an effect: reads (GET), requests
that compute without keeping anything (tokenize), and any request whose connection was never
made (refused or timed out while connecting, so nothing was sent). A generation that may have
started is never sent twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from .base import EngineError

RETRY_DELAYS_S = (0.2, 0.5, 1.0)  # then give up: a server down for 2 s is down
TRANSIENT = frozenset({502, 503, 504})  # a proxy or a loading server: a read may be retried
NOT_OFFERED = frozenset({400, 404, 405, 422, 501})  # an optional endpoint the server lacks
# connect and write fail fast; a read may wait for the server's queue and a long prefill
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)


class RemoteError(EngineError):
    """An EngineError from the remote server; `status` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def base_url(url: str) -> str:
    """The server's root: what users copy from an editor config often ends in /v1."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def server_message(resp: httpx.Response) -> str:
    """The error text in a response body, in the shapes servers use: OpenAI and llama.cpp
    `{"error": {"message"}}`, Ollama `{"error": "..."}`, FastAPI `{"detail": ...}`."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:300]
    if not isinstance(body, dict):
        return str(body)[:300]
    err = body.get("error", body.get("detail", body.get("message")))
    if isinstance(err, dict):
        err = err.get("message") or json.dumps(err)
    if isinstance(err, list):  # FastAPI validation errors
        err = "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in err)
    return str(err if err is not None else body)[:300]


class Remote:
    """The server at `url` (with or without /v1), authenticated by `api_key` when given."""

    def __init__(self, url: str, api_key: str = "", timeout: httpx.Timeout = TIMEOUT):
        self.url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def get(self, path: str) -> dict:
        """GET `path` as JSON; retried (a read has no effect)."""
        return self._json(self._send("GET", path, None, idempotent=True))

    def post(self, path: str, body: dict, idempotent: bool = False) -> dict:
        return self._json(self._send("POST", path, body, idempotent))

    def optional(self, method: str, path: str, body: dict | None = None) -> dict | None:
        """An endpoint only some servers offer: its JSON, or None where it is not offered."""
        try:
            return self._json(self._send(method, path, body, idempotent=True))
        except RemoteError as e:
            if e.status in NOT_OFFERED:
                return None
            raise

    @contextmanager
    def stream(self, path: str, body: dict) -> Iterator[Iterator[dict]]:
        """POST `body` and yield its server-sent events as parsed JSON; leaving the block closes
        the connection, which is how the server learns that the client went away."""
        resp = self._send("POST", path, body, idempotent=False, stream=True)
        try:
            yield self._events(resp)
        finally:
            resp.close()

    # ----------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict | None, idempotent: bool,
              stream: bool = False) -> httpx.Response:  # fmt: skip
        """The response (status checked); connection failures retried, and with `idempotent`
        also transient statuses and broken connections."""
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            last = attempt == len(RETRY_DELAYS_S)
            try:
                req = self.client.build_request(method, path, json=body)
                resp = self.client.send(req, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing was sent
                if last:
                    raise self._unreachable(path, e) from e
            except httpx.TransportError as e:  # sent, maybe in part: only reads are retried
                if last or not idempotent:
                    raise self._broken(path, e) from e
            else:
                if resp.status_code < 400:
                    return resp
                if last or not idempotent or resp.status_code not in TRANSIENT:
                    raise self._refused(path, resp)
                resp.close()
            time.sleep(RETRY_DELAYS_S[attempt])
        raise AssertionError("unreachable")

    def _json(self, resp: httpx.Response) -> dict:
        try:
            return resp.json()
        except ValueError as e:
            what = f"something that is not JSON: {resp.text[:200]!r}"
            raise RemoteError(
                f"the model server at {self.url} answered {resp.url.path} with {what}"
            ) from e

    def _events(self, resp: httpx.Response) -> Iterator[dict]:
        """Server-sent events: `data: {json}` lines until `data: [DONE]` (or the end)."""
        try:
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, `event:` names, `:` keep-alive comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError as e:
                    raise RemoteError(f"the model server at {self.url} sent an event that "
                                      f"is not JSON: {data[:200]!r}") from e  # fmt: skip
                if isinstance(event, dict) and "error" in event:
                    msg = server_message(httpx.Response(500, json=event))
                    raise RemoteError(f"the model server at {self.url} stopped the answer: {msg}")
                yield event
        except httpx.TransportError as e:
            raise self._broken(resp.url.path, e) from e

    def _unreachable(self, path: str, e: Exception) -> RemoteError:
        why = "connection refused" if isinstance(e, httpx.ConnectError) else "no connection"
        return RemoteError(
            f"cannot reach the model server at {self.url} ({why}: {e}); is it running, and is "
            "remote_url (LOCALAI_REMOTE_URL) right?"
        )

    def _broken(self, path: str, e: Exception) -> RemoteError:
        what = "timed out" if isinstance(e, httpx.TimeoutException) else "broke off"
        return RemoteError(f"the request to {self.url}{path} {what}: {e or type(e).__name__}")

    def _refused(self, path: str, resp: httpx.Response) -> RemoteError:
        resp.read()  # a streamed response has not read its body yet
        msg = server_message(resp)
        resp.close()
        hint = ""
        if resp.status_code in (401, 403):
            hint = " (check remote_api_key, LOCALAI_REMOTE_API_KEY)"
        return RemoteError(
            f"the model server at {self.url} answered {path} with {resp.status_code} "
            f"{resp.reason_phrase}: {msg}{hint}",
            resp.status_code,
        )
