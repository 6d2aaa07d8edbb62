"""Find the daemon for this LOCALAI_HOME, or start one in the background and wait for it.

The TUI never loads a model: it talks to `localai serve`. A daemon it starts keeps running after
the TUI quits (like Ollama's server), so the next start is instant, but not forever: its model
unloads after `keep_alive` without requests, and the daemon itself exits after
`daemon_idle_exit` with no request at all (`--idle-exit`; a daemon the user started with
`localai serve` runs until stopped). Its log is $LOCALAI_HOME/logs/daemon.log (0600, in a 0700
folder).

Before the token goes anywhere, the daemon on the port must prove it holds this home's token
(`localai.daemon_client.verified_connection`, the check the CLI makes): a process of another
user that took the port first gets neither the token nor a question.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from localai.config import Settings
from localai.daemon_client import NotOurDaemon, verified_connection
from localai.private import private_dir, private_file


@dataclass
class Endpoint:
    url: str
    token: str
    model: str = ""  # what the daemon serves


def _token(home: Path) -> str | None:
    try:
        return (home / "token").read_text().strip() or None
    except OSError:
        return None


def _health(url: str) -> dict | None:
    try:
        r = httpx.get(f"{url}/health", timeout=1.0)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def find_or_start(
    settings: Settings, model: str | None = None, serve_args: list[str] | None = None,
    wait_s: float = 600,
) -> Endpoint:  # fmt: skip
    url = f"http://{settings.host}:{settings.port}"
    health = _health(url)
    if health is None:
        log = settings.home / "logs" / "daemon.log"
        private_dir(settings.home)
        private_file(log)
        cmd = [sys.executable, "-m", "localai", "--home", str(settings.home), "serve",
               "--host", settings.host, "--port", str(settings.port),
               "--idle-exit", settings.daemon_idle_exit]  # fmt: skip
        if model:
            cmd += ["--model", model]
        cmd += serve_args or []
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + wait_s
        while (health := _health(url)) is None:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"the daemon did not start: {' / '.join(tail)} (see {log})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not answer within {wait_s:.0f}s (see {log})")
            time.sleep(0.25)
    token = _token(settings.home)
    if token is None:
        raise RuntimeError(f"a daemon answers at {url} but {settings.home}/token is missing")
    _verify(settings, token)
    return Endpoint(url, token, str(health.get("model", "")))


def _verify(settings: Settings, token: str) -> None:
    """Raise unless the daemon on the port proves it is this home's (nothing is sent first)."""
    try:
        verified_connection(settings.host, settings.port, token, timeout=10).close()
    except NotOurDaemon as e:
        raise RuntimeError(f"{e}. Stop it, or give localai another port (`port` in "
                           f"{settings.config_file})") from e  # fmt: skip
    except OSError as e:
        raise RuntimeError(f"the daemon at {settings.host}:{settings.port} stopped "
                           f"answering ({e})") from e  # fmt: skip
