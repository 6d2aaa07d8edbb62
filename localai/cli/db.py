"""`localai db start|stop|status`: a PostgreSQL server under the data dir for the document
index, for someone who has none (see localai/index/pg_server.py). It prints the URI to put in
index_store; a team points every machine at one shared server instead."""

from __future__ import annotations

import json

import click

from ..terminal import shown
from .app import log, main, settings_of
from .index import index_errors


def _hint(uri: str) -> None:
    log(f"PostgreSQL is running: {shown(uri)}")
    log(f"use it for the index: index_store = \"{shown(uri)}\" in config.toml, or "
        f"LOCALAI_INDEX_STORE='{shown(uri)}'")  # fmt: skip


@main.group("db")
def db():
    """A local PostgreSQL server for the document index (data under the home)."""


@db.command("start")
@click.option("--json", "as_json", is_flag=True, help='Print {"uri": …} only.')
@click.pass_context
@index_errors
def db_start(ctx, as_json):
    """Start the server (creating it on first use) and print its URI."""
    from ..index import pg_server

    uri = pg_server.start(settings_of(ctx).home)
    if as_json:
        click.echo(json.dumps({"uri": uri}))
    else:
        _hint(uri)


@db.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@index_errors
def db_status(ctx, as_json):
    """Whether the server runs, and its URI."""
    from ..index import pg_server

    uri = pg_server.running_uri(settings_of(ctx).home)
    if as_json:
        click.echo(json.dumps({"running": uri is not None, "uri": uri}))
    elif uri:
        _hint(uri)
    else:
        log("no PostgreSQL server runs from this home; `localai db start` starts one")


@db.command("stop")
@click.pass_context
@index_errors
def db_stop(ctx):
    """Stop the server (its data stays; `localai db start` resumes it)."""
    from ..index import pg_server

    stopped = pg_server.stop(settings_of(ctx).home)
    log("stopped" if stopped else "no PostgreSQL server was running from this home")
