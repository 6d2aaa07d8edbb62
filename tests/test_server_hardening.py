"""The API against a web page and against whoever can open sockets on this machine: Host, Origin
and Content-Type checks with auth on and off, slow and idle connections cut off under a small
descriptor limit, clients that leave mid-body, and paths a user can get wrong. Real daemons on
127.0.0.1, raw sockets where a browser or an attacker would not behave like a client library."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import openai
import pytest
from conftest import EMBED_MODEL, TEST_MODEL
from daemon_helpers import start_daemon, write_docs
from openai_schema import check

from localai.catalog import Catalog

FD_LIMIT = 256  # the limit the issue was reported with


@pytest.fixture(scope="module")
def open_daemon(models_dir, tmp_path_factory):
    """`localai serve --no-auth` that may open at most FD_LIMIT files, with a small index."""
    Catalog(models_dir).ensure(EMBED_MODEL, log=print)
    root = tmp_path_factory.mktemp("no-auth")
    docs = write_docs(root / "docs")
    with start_daemon(root / "home", models_dir, TEST_MODEL, "--no-auth", docs=docs,
                      fd_limit=FD_LIMIT) as d:  # fmt: skip
        yield d


def raw(d, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request on a raw socket, with exactly these headers (Host included)."""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n" if body else "\r\n"
    with socket.create_connection((d.host, d.port), timeout=120) as sock:
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    top, _, payload = reply.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    got = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), got, payload


def sources(d) -> list[str]:
    return [s["path"] for s in d.request("GET", "/localai/index")[1]["sources"]]


def test_no_auth_daemon_cannot_be_driven_by_a_web_page(open_daemon, tmp_path):
    d = open_daemon
    secret = tmp_path / "ssh"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY material\n")
    own = {"Host": f"127.0.0.1:{d.port}"}
    body = json.dumps({"path": str(secret)}).encode()
    attacks = [  # what a page can send without a CORS preflight, or after DNS rebinding
        ("text/plain CSRF", own | {"Content-Type": "text/plain"}, 415),
        ("untyped Blob CSRF", own, 415),
        ("form CSRF", own | {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("cross-origin JSON", own | {"Content-Type": "application/json",
                                     "Origin": "http://evil.example"}, 403),
        ("opaque origin", own | {"Content-Type": "application/json", "Origin": "null"}, 403),
        ("another local port", own | {"Content-Type": "application/json",
                                      "Origin": "http://127.0.0.1:9"}, 403),
        ("fetch metadata", own | {"Content-Type": "application/json",
                                  "Sec-Fetch-Site": "cross-site"}, 403),
        ("DNS rebinding", {"Host": f"evil.example:{d.port}",
                           "Content-Type": "application/json"}, 403),
    ]  # fmt: skip
    for what, headers, status in attacks:
        got, head, payload = raw(d, "POST", "/localai/index", headers, body)
        assert got == status, (what, payload)
        check("ErrorResponse", json.loads(payload))
        assert not any(k.startswith("access-control-") for k in head), what  # no CORS, ever
    assert str(secret) not in sources(d)
    rebound = {"Host": f"attacker.example:{d.port}"}
    assert raw(d, "GET", "/health", rebound)[0] == 403
    q = json.dumps({"query": "PRIVATE KEY"}).encode()
    as_json = {"Content-Type": "application/json"}
    assert raw(d, "POST", "/localai/search", rebound | as_json, q)[0] == 403
    preflight = own | {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    status, head, _ = raw(d, "OPTIONS", "/localai/index", preflight)
    assert status == 403 and "access-control-allow-origin" not in head
    own_names = (f"localhost:{d.port}", f"127.0.0.1:{d.port}", "127.0.0.1", "localhost:9000")
    for host in own_names:  # this server's names, on any port (a tunnel may forward another)
        assert raw(d, "GET", "/health", {"Host": host})[0] == 200, host
    same = own | {"Origin": f"http://127.0.0.1:{d.port}", "Content-Type": "application/json"}
    assert raw(d, "POST", "/localai/search", same, q)[0] == 200
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()][0] == TEST_MODEL  # clients pass unchanged


def test_health_refuses_a_rebinding_host_with_auth_on(daemon):
    status, _, payload = raw(daemon, "GET", "/health", {"Host": f"rebind.example:{daemon.port}"})
    assert status == 403 and b"busy" not in payload
    assert raw(daemon, "GET", "/health", {"Host": f"127.0.0.1:{daemon.port}"})[0] == 200
    status, _, payload = raw(daemon, "POST", "/api/chat",
                             {"Host": f"127.0.0.1:{daemon.port}", "Content-Type": "text/plain"},
                             b"{}")  # fmt: skip
    assert status == 415 and isinstance(json.loads(payload)["error"], str)  # Ollama's shape


def test_paths_a_user_can_get_wrong_are_400s(daemon):
    for path in ("~no-such-user-here/notes", "~\u0000x"):
        status, body = daemon.request("POST", "/localai/index", {"path": path})
        assert status == 400 and body["error"]["param"] == "path", body
        chat = {"model": TEST_MODEL, "messages": [{"role": "user", "content": "Who built it?"}],
                "max_tokens": 2, "docs": {"source": path}}  # fmt: skip
        status, body = daemon.request("POST", "/v1/chat/completions", chat)
        assert status == 400 and body["error"]["param"] == "docs.source", body


def _log_after(d, start: int) -> str:
    return d.log.read_text()[start:]


def test_a_client_that_leaves_mid_body_costs_no_traceback(open_daemon):
    d = open_daemon
    start = len(d.log.read_text())
    for _ in range(3):
        with socket.create_connection((d.host, d.port), timeout=30) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                         '{"model": '.encode())  # fmt: skip
            time.sleep(0.3)  # the handler is waiting for the rest of the body
    assert d.health()["status"] == "ok"
    time.sleep(0.5)
    assert "Traceback" not in _log_after(d, start) and "Exception" not in _log_after(d, start)


def _hold(d, sent: bytes) -> socket.socket | None:
    """A connection that sends `sent` and then nothing; None if the server refused it."""
    try:
        sock = socket.create_connection((d.host, d.port), timeout=10)
        if sent:
            sock.sendall(sent)
        return sock
    except OSError:
        return None


def _closed_by_server(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        pass
    return True


def test_idle_and_slow_connections_cannot_starve_the_daemon(open_daemon):
    """More idle, half-sent and slowly dripping connections than the daemon has descriptors:
    /health still answers, and every such connection is closed by the server."""
    d = open_daemon
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nX-Slow: ".encode()
    body = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()  # fmt: skip
    kinds = [b""] * 150 + [head] * 80 + [body] * 70  # idle, half a head, half a body
    held = [s for s in (_hold(d, k) for k in kinds) if s is not None]
    stop = threading.Event()
    drip = [s for s in (_hold(d, head) for _ in range(5)) if s is not None]

    def dripping() -> None:  # a byte every second: never a whole request
        while not stop.wait(1.0):
            for s in drip:
                with contextlib.suppress(OSError):
                    s.send(b"a")

    t = threading.Thread(target=dripping, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        status, health = d.request("GET", "/health", token=None)  # urllib: 300 s at most
        assert status == 200 and health["status"] == "ok"
        survivors = held[-20:] + drip  # the newest: not closed to make room for others
        assert all(_closed_by_server(s, 90) for s in survivors)
        assert time.monotonic() - t0 < 180  # cut by the request deadline, not left open
        assert d.request("GET", "/health", token=None)[0] == 200
    finally:
        stop.set()
        for s in held + drip:
            s.close()
