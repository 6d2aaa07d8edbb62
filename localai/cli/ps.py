"""`localai ps` and `localai stop`: what the daemon holds in memory and until when, and giving it
back now — the daemon's counterparts of `ollama ps` and `ollama stop`.

    localai ps [--json]    loaded models (size, context, until when), then RAM by holder
    localai stop MODEL     unload MODEL (Ollama's way: /api/generate with keep_alive 0)
    localai stop           stop the daemon; returns once its port is free
"""

from __future__ import annotations

import json
import socket
import time

import click
from rich.console import Console
from rich.table import Table

from ..durations import until
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
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"):
        t.add_column(col, no_wrap=True)
    for m in loaded.get("models", []):
        left = (m.get("localai") or {}).get("unloads_in_s")
        t.add_row(m["name"], (m.get("digest") or "")[:12], mib(m.get("size")), "100% CPU",
                  str(m.get("context_length", "")), until(left))  # fmt: skip
    out = Console()
    if t.row_count:
        out.print(t)
    else:
        out.print(f"no model loaded (the daemon at http://{d.host}:{d.port} loads one on the "
                  "next request)")  # fmt: skip
    holders = {k: v for k, v in (memory.get("holders") or {}).items() if v}
    if holders:
        out.print(f"\nRAM by holder ({mib(memory.get('held_bytes'))} of the "
                  f"{mib(memory.get('budget_bytes'))} budget):")  # fmt: skip
        for name, n in sorted(holders.items(), key=lambda kv: -kv[1]):
            out.print(f"  {name:<16} {mib(n):>10}")
    last = memory.get("last_pressure")
    if last:
        out.print(f"\nlast memory pressure {_ago(last['at'])}: {last['reason']}; "
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
    if not _wait_port_free(d.host, d.port, STOP_WAIT_S):
        raise click.ClickException(f"the daemon was asked to stop but {d.host}:{d.port} is still "
                                   f"taken after {STOP_WAIT_S}s")  # fmt: skip
    click.echo(f"stopped the daemon at http://{d.host}:{d.port}")


def _message(body: dict) -> str:
    err = body.get("error")
    return err.get("message", "") if isinstance(err, dict) else str(err or "")


def _wait_port_free(host: str, port: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            return True
        time.sleep(0.1)
    return False
