"""`localai ps` and `localai stop`: what the daemon holds in memory and until when, and giving it
back now — the daemon's counterparts of `ollama ps` and `ollama stop`.

    localai ps [--json]    loaded models (size, context, until when), then RAM by holder
    localai stop MODEL     unload MODEL (Ollama's way: /api/generate with keep_alive 0)
    localai stop           stop the daemon; returns once its port is free
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import click

from ..durations import until
from ..server.auth import is_loopback
from .app import find_daemon, main, settings_of, user_errors

STOP_WAIT_S = 30  # the daemon ends running answers at once; closing takes a moment


def daemon_status(settings) -> dict | None:
    """The running daemon's /localai/status (memory, residency), or None with no daemon."""
    d = find_daemon(settings, "shown as not running")
    if d is None:
        return None
    code, body = d.call("GET", "/localai/status")
    return body if code == 200 else None


def mib(n: int | None) -> str:
    n = n or 0
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print /api/ps and the memory as JSON.")
@click.pass_context
@user_errors
def ps(ctx, as_json):
    """Loaded models, the RAM each part holds, and when each model unloads."""
    s = settings_of(ctx)
    d = find_daemon(s, "shown as not running")
    if d is None:
        if as_json:
            click.echo(json.dumps({"daemon": None, "models": [], "memory": None}))
        else:
            click.echo("no localai daemon is running: nothing is loaded")
        return
    _, loaded = d.call("GET", "/api/ps")
    _, status = d.call("GET", "/localai/status")
    memory = status.get("memory") or {}
    if as_json:
        out = {"daemon": f"http://{d.host}:{d.port}", "models": loaded.get("models", []),
               "memory": memory, "residency": status.get("residency")}  # fmt: skip
        click.echo(json.dumps(out))
        return
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for m in loaded.get("models", []):
        left = (m.get("localai") or {}).get("unloads_in_s")
        remote = (m.get("localai") or {}).get("remote_url")
        where = f"remote {remote}" if remote else "100% CPU"
        rows.append((m["name"], (m.get("digest") or "")[:12], mib(m.get("size")), where,
                     str(m.get("context_length", "")), until(left)))  # fmt: skip
    if len(rows) > 1:  # columns as `ollama ps` prints them, never cut to the terminal's width
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    else:
        click.echo(f"no model loaded (the daemon at http://{d.host}:{d.port} loads one on the "
                   "next request)")  # fmt: skip
    holders = {k: v for k, v in (memory.get("holders") or {}).items() if v}
    if holders:
        click.echo(f"\nRAM by holder ({mib(memory.get('held_bytes'))} of the "
                   f"{mib(memory.get('budget_bytes'))} budget):")  # fmt: skip
        for name, n in sorted(holders.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {name:<16} {mib(n):>10}")
    last = memory.get("last_pressure")
    if last:
        click.echo(f"\nlast memory pressure {_ago(last['at'])}: {last['reason']}; "
                   f"freed {mib(last['freed_bytes'])}")  # fmt: skip


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f} min ago"


@main.command()
@click.argument("model", required=False)
@click.pass_context
@user_errors
def stop(ctx, model):
    """Unload MODEL now, or with no MODEL stop the daemon (its port is free on return)."""
    s = settings_of(ctx)
    d = find_daemon(s, "nothing to stop")
    if d is None:
        click.echo("no localai daemon is running")
        return
    if model:
        code, body = d.call("POST", "/api/generate", {"model": model, "keep_alive": 0},
                            timeout=STOP_WAIT_S)  # fmt: skip
        if code != 200:
            raise click.ClickException(_message(body) or f"the daemon answered {code}")
        click.echo(f"unloaded {model}")
        return
    code, body = d.call("POST", "/localai/stop", {})
    if code != 200:
        raise click.ClickException(_message(body) or f"the daemon answered {code}")
    deadline = time.monotonic() + STOP_WAIT_S
    if not _wait(lambda: _port_free(d.host, d.port), deadline):
        raise click.ClickException(f"the daemon was asked to stop but {d.host}:{d.port} is still "
                                   f"taken after {STOP_WAIT_S}s")  # fmt: skip
    pid = body.get("pid")
    if isinstance(pid, int) and is_loopback(d.host):  # and its memory is given back
        _wait(lambda: _gone(pid), deadline)
    click.echo(f"stopped the daemon at http://{d.host}:{d.port}")


def _message(body: dict) -> str:
    err = body.get("error")
    return err.get("message", "") if isinstance(err, dict) else str(err or "")


def _wait(done, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return False


def _port_free(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


def _gone(pid: int) -> bool:
    """True once process `pid` has exited (a zombie holds no memory; its parent reaps it), or
    when it cannot be seen from here (another user's, another PID namespace)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
