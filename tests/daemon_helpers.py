"""A real `localai serve` subprocess on a free loopback port, and helpers for talking to it.

Used by the server tests through the session fixture `daemon` (conftest.py): one model load for
all of them. Every wait is a bounded loop that stops by itself.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TEST_CTX = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    proc: subprocess.Popen
    host: str
    port: int
    home: Path
    token: str
    model: str
    log: Path
    docs: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def headers(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}

    def request(self, method: str, path: str, body=None, token: str | None = "",
                raw: bytes | None = None, headers: dict | None = None):  # fmt: skip
        """(status, parsed JSON or text). token "" uses the daemon's; None sends none."""
        h = {} if token is None else self.headers(token or None)
        h |= headers or {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def health(self) -> dict:
        return self.request("GET", "/health", token=None)[1]

    def wait_idle(self, tries: int = 600) -> dict:
        """Poll /health until no generation runs or waits (at most `tries` × 0.1 s)."""
        for _ in range(tries):
            h = self.health()
            if not h["busy"] and not h["waiting"]:
                return h
            time.sleep(0.1)
        raise AssertionError(f"daemon still busy: {h}")


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, tries: int = 1200) -> None:
    for _ in range(tries):
        if proc.poll() is not None:
            raise RuntimeError(f"localai serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"localai serve did not become ready:\n{log.read_text()}")


DOCS = {
    "lighthouse.md": "# The Brightwater lighthouse\n\nThe Brightwater lighthouse stands on the "
    "north cape of Kelby Island.\nIt was built in 1871 by the engineer Maren Holt.\nIts lamp "
    "can be seen from 22 nautical miles away.\n",
    "garden.txt": "Tomatoes need at least six hours of direct sun each day.\nWater them deeply "
    "twice a week rather than a little every day.\n",
}


def write_docs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


@contextmanager
def start_daemon(home: Path, models_dir: Path, model: str, *args: str, docs: Path | None = None,
                 fd_limit: int | None = None):  # fmt: skip
    """Run `localai serve` until the block ends; the process is always killed at the end.
    With `docs`, that folder is indexed first (the daemon's watcher then follows it); with
    `fd_limit`, the daemon may open at most that many files (soft and hard limit)."""
    port = free_port()
    env = dict(os.environ, LOCALAI_HOME=str(home), LOCALAI_MODELS=str(models_dir))
    for var in ("LOCALAI_MODEL", "LOCALAI_ENGINE", "LOCALAI_CONTEXT_LENGTH", "LOCALAI_HOST",
                "LOCALAI_PORT"):  # fmt: skip
        env.pop(var, None)
    log = home / "serve.log"
    home.mkdir(parents=True, exist_ok=True)
    if docs is not None:
        r = subprocess.run([sys.executable, "-m", "localai", "index", str(docs)], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
    cmd = [sys.executable, "-m", "localai", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--ctx", str(TEST_CTX), "--threads", "2", *args]  # fmt: skip

    def limit() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=limit)  # fmt: skip
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", log)
        token = (home / "token").read_text().strip() if "--no-auth" not in args else ""
        yield Daemon(proc, "127.0.0.1", port, home, token, model, log, docs)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
