"""What a local API must survive: no token, bad input, prompts too long for the context, many
clients at once, clients that leave mid-answer, and a fuzz run against its own OpenAPI document.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import TEST_MODEL
from daemon_helpers import TEST_CTX, start_daemon
from openai_schema import check

CHAT = [{"role": "user", "content": "Say hello."}]


def chat_body(**kw) -> dict:
    return {"model": TEST_MODEL, "messages": CHAT, "max_tokens": 2} | kw


def test_token_is_required_except_on_health(daemon):
    assert stat.S_IMODE((daemon.home / "token").stat().st_mode) == 0o600
    assert daemon.request("GET", "/health", token=None)[0] == 200
    for path in ("/v1/models", "/api/tags", "/openapi.json"):
        status, body = daemon.request("GET", path, token=None)
        assert status == 401, path
    status, body = daemon.request("GET", "/v1/models", token="not-the-token")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    check("ErrorResponse", body)
    status, body = daemon.request("POST", "/api/chat", chat_body(), token="wrong")
    assert status == 401 and isinstance(body["error"], str)  # Ollama's error shape
    bad = openai.OpenAI(base_url=daemon.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(
    "raw, status, param",
    [
        (b'{"model": "x",', 400, None),  # malformed JSON
        (b"", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "smollm2-135m", "messages": [], "max_tokens": 2}', 400, "messages"),
        (json.dumps(chat_body(temperature="hot")).encode(), 400, "temperature"),
        (json.dumps(chat_body(max_tokens=-3)).encode(), 400, "max_tokens"),
        (json.dumps(chat_body(messages="hi")).encode(), 400, "messages"),
        (json.dumps(chat_body(messages=[{"role": "wizard", "content": "x"}])).encode(), 400,
         "messages.0.role"),
        (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], '
         b'"temperature": NaN}', 400, None),
        (json.dumps(chat_body(model="gpt-4o")).encode(), 404, "model"),
    ],
)  # fmt: skip
def test_bad_requests_get_clean_4xx(daemon, raw, status, param):
    got, body = daemon.request("POST", "/v1/chat/completions", raw=raw)
    assert got == status, body
    check("ErrorResponse", body)
    assert body["error"]["param"] == param and body["error"]["message"]


def test_routes_methods_and_body_size(daemon):
    status, body = daemon.request("GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["message"]
    status, body = daemon.request("GET", "/v1/chat/completions")
    assert status == 405
    big = 9 << 20
    announced = f"Content-Length: {big}\r\n\r\n".encode() + b"x" * 65536
    assert _status_of(daemon, "/v1/embeddings", announced) == 413
    chunk = b"x" * (1 << 20)
    chunked = b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)
    )
    assert _status_of(daemon, "/v1/embeddings", chunked) == 413


def _status_of(daemon, path: str, rest: bytes) -> int:
    """Send a POST whose headers end with `rest` (the server may hang up mid-body); the status."""
    sock = socket.create_connection((daemon.host, daemon.port), timeout=120)
    head = (f"POST {path} HTTP/1.1\r\nHost: {daemon.host}\r\n"
            f"Authorization: Bearer {daemon.token}\r\n"
            "Content-Type: application/json\r\n")  # fmt: skip
    with contextlib.suppress(OSError):  # the server may answer before reading it all
        sock.sendall(head.encode() + rest)
    reply = sock.recv(4096)
    sock.close()
    return int(reply.split(b" ", 2)[1])


def test_prompt_over_the_context_is_refused_with_both_counts(daemon):
    body = chat_body(messages=[{"role": "user", "content": "word " * (TEST_CTX + 100)}])
    status, out = daemon.request("POST", "/v1/chat/completions", body)
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    msg = out["error"]["message"]
    assert f"{TEST_CTX:,}" in msg and "prompt is 1," in msg
    long = {"model": TEST_MODEL, "prompt": "word " * (TEST_CTX + 100), "stream": False}
    status, out = daemon.request("POST", "/api/generate", long)
    assert status == 400 and f"{TEST_CTX:,}" in out["error"]


def test_eight_concurrent_streaming_clients_all_finish(daemon):
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.token, max_retries=0)

    def one(i: int) -> tuple[set, str, str | None]:
        stream = client.chat.completions.create(
            model=TEST_MODEL, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=4, stream=True, seed=i)  # fmt: skip
        ids, text, finish = set(), "", None
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return ids, text, finish

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(len(ids) == 1 and text and finish in ("stop", "length")
               for ids, text, finish in results)  # fmt: skip
    assert len(set.union(*(r[0] for r in results))) == 8
    assert daemon.wait_idle()["waiting"] == 0


def _open_request(daemon, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((daemon.host, daemon.port), timeout=120)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {daemon.host}\r\n"
            f"Authorization: Bearer {daemon.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_leaves_cancels_its_generation(daemon, stream):
    daemon.wait_idle()
    before = daemon.health()["cancelled"]
    ask = [{"role": "user", "content": "Write a very long story."}]
    long = chat_body(max_tokens=TEST_CTX - 64, temperature=1.0, stream=stream, messages=ask)
    sock = _open_request(daemon, long)
    if stream:  # wait for the first content chunk, then hang up
        seen = b""
        while seen.count(b"data: ") < 3:
            chunk = sock.recv(4096)
            assert chunk, seen  # closed before streaming: fail, never spin
            seen += chunk
    else:  # wait until the generation holds the slot, then hang up
        for _ in range(600):
            if daemon.health()["busy"]:
                break
    sock.close()
    after = daemon.wait_idle()
    assert after["cancelled"] == before + 1
    status, body = daemon.request("POST", "/v1/chat/completions", chat_body())
    assert status == 200 and body["usage"]["completion_tokens"] == 2


@pytest.mark.slow
def test_fuzz_run_finds_no_server_error(models_dir, tmp_path):
    """schemathesis against the server's own /openapi.json: no request may cause a 5xx. A small
    context bounds every generation (requests without max_tokens run to the context's end), so
    a loaded machine slows the run down but does not time it out."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is a test dependency"
    with start_daemon(tmp_path / "home", models_dir, TEST_MODEL, "--ctx", "160") as d:
        cmd = [st, "run", d.url + "/openapi.json", "-H", f"Authorization: Bearer {d.token}",
               "--checks", "not_a_server_error", "--max-examples", "5", "--workers", "1",
               "--max-time", "40", "--seed", "7", "--generation-database", "none",
               "--request-timeout", "600", "--no-color",
               "--phases", "coverage,fuzzing"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                           env=dict(os.environ, SCHEMATHESIS_HOOKS=""))  # fmt: skip
        log = d.log.read_text()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "internal error" not in log, log[-3000:]
