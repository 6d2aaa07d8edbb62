"""`localai plugins`: what is loaded, from where, which hooks, and what failed."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from .. import plugins as plugin_set
from .app import main, user_errors


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def plugins_cmd(as_json):
    """List loaded plugins (built-in and installed), their hooks, and any errors."""
    p = plugin_set.get()
    rows = p.report()
    tools = sorted(plugin_set.tools())
    if as_json:
        click.echo(json.dumps({"plugins": p.report(), "tools": tools}))
        return
    t = Table()
    for col in ("plugin", "from", "hooks", "status"):
        t.add_column(col, overflow="fold")
    for r in rows:
        status = "[red]" + "; ".join(r["errors"]) + "[/red]" if r["errors"] else "ok"
        hooks = ", ".join(h.removeprefix("localai_register_") for h in r["hooks"])
        t.add_row(r["name"], r["source"], hooks or "-", status)
    out = Console()
    out.print(t)
    out.print(f"tools: {', '.join(tools) or 'none'}")


def register_plugin_commands() -> None:
    """Let plugins add commands to the `localai` group (a broken one is reported, not fatal)."""
    plugin_set.get().call_each("localai_register_commands", cli=main)
