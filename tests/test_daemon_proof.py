"""The CLI and the TUI talk only to the daemon of their home. A fake server on the configured port
(another user's, say) gets neither the token nor the query, even when it relays the challenge to
a real daemon on another port; the CLI says what it found and searches or runs in-process."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import TEST_MODEL, localai

from localai.config import load_settings

PLANTED = {"chunk_id": 1, "file_id": 1, "path": "/planted.txt", "start_line": 1, "end_line": 1,
           "start_byte": 0, "end_byte": 7, "score": 1.0, "hash": "00", "bm25_rank": 1,
           "vector_rank": None, "text": "planted", "verified": True, "reason": "",
           "pages": None, "where": "/planted.txt:1-1"}  # fmt: skip


@contextmanager
def fake_daemon(relay_to: str | None = None):
    """An HTTP server that answers like localai and records every request it gets; its proof
    is made up, or relayed from the daemon at `relay_to`."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("latin-1")
            seen.append(f"{self.command} {self.path}\n{self.headers}\n{body}")
            if self.path.startswith("/localai/proof"):
                out = json.dumps({"proof": "0" * 64}).encode()
                if relay_to:
                    with urllib.request.urlopen(relay_to + self.path, timeout=30) as r:
                        out = r.read()
            elif self.path == "/localai/search":
                out = json.dumps({"hits": [PLANTED]}).encode()
            else:
                out = json.dumps({"status": "ok", "model": TEST_MODEL, "busy": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("relay", [False, True], ids=["made-up proof", "relayed proof"])
def test_a_server_on_the_port_that_is_not_ours_gets_nothing(daemon, models_dir, tmp_path,
                                                            monkeypatch, relay):  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(daemon.home / "token", home / "token")  # the real daemon could prove this key
    token = (home / "token").read_text().strip()
    query = "which lighthouse keeper wrote the secret diary"
    with fake_daemon(daemon.url if relay else None) as (port, seen):
        env = dict(os.environ, LOCALAI_HOME=str(home), LOCALAI_HOST="127.0.0.1",
                   LOCALAI_PORT=str(port), LOCALAI_MODELS=str(models_dir),
                   COLUMNS="500")  # fmt: skip
        r = localai("search", query, "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []  # this home's own (empty) index, not the planted hit
        assert "is not localai's daemon for this home" in r.stderr
        assert "nothing was sent to it; searching here instead" in r.stderr
        status = localai("status", "--json", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["daemon"] is None
        run = localai("run", query, "--model", TEST_MODEL, "--max-tokens", "1", "--json",
                      env=env)  # fmt: skip
        assert run.returncode == 0 and "running the model here instead" in run.stderr
        from localai_tui.connect import find_or_start

        monkeypatch.setenv("LOCALAI_HOME", str(home))
        monkeypatch.setenv("LOCALAI_PORT", str(port))
        with pytest.raises(RuntimeError, match="not localai's daemon for this home"):
            find_or_start(load_settings(), wait_s=5)
    asked = {s.split("?")[0].split("\n")[0] for s in seen}
    assert asked == {"GET /localai/proof", "GET /health"}, seen  # /health: the TUI, no token
    leaked = [s for s in seen if token in s or "lighthouse" in s or "Authorization" in s]
    assert leaked == []


def test_our_daemon_proves_itself(daemon, tmp_path):
    """The same checks pass against the real daemon, which then gets the query."""
    env = dict(os.environ, LOCALAI_HOME=str(daemon.home), LOCALAI_HOST=daemon.host,
               LOCALAI_PORT=str(daemon.port))  # fmt: skip
    r = localai("search", "Who built the Brightwater lighthouse?", "--json", "-k", "1", env=env)
    assert r.returncode == 0 and "not localai's daemon" not in r.stderr, r.stderr
    assert json.loads(r.stdout)[0]["verified"]
    for bad in ("", "xyz", "ab" * 100):
        status, body = daemon.request("GET", f"/localai/proof?challenge={bad}", token=None)
        assert status == 400 and body["error"]["param"] == "challenge"
