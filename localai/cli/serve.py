"""`localai serve`: the daemon (localai/daemon.py) in the foreground."""

from __future__ import annotations

import click

from ..server.auth import ensure_token
from .app import engine_options, log, main, progress_bars, settings_of, user_errors


@main.command()
@click.option("--host", help="Address to listen on (default: settings, 127.0.0.1).")
@click.option("--port", type=int, help="Port (default: settings, 8765).")
@engine_options
@click.option("--print-token", is_flag=True, help="Print the API token (creating it) and exit.")
@click.option("--no-auth", is_flag=True, help="Serve without a token (loopback addresses only).")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.pass_context
@user_errors
def serve(ctx, host, port, model, engine, context_length, threads, type_k, type_v,
          print_token, no_auth, access_log):  # fmt: skip
    """Serve the model over an OpenAI- and Ollama-compatible HTTP API.

    Every route but /health needs `Authorization: Bearer <token>`; the token lives in
    $LOCALAI_HOME/token (mode 0600), and --print-token prints it for editor setup."""
    s = settings_of(ctx, host=host, port=port, model=model, engine=engine,
                    context_length=context_length, threads=threads, type_k=type_k,
                    type_v=type_v)  # fmt: skip
    if print_token:
        click.echo(ensure_token(s.home))
        return
    from ..daemon import serve as run_daemon

    with progress_bars() as bars:
        run_daemon(s, s.host, s.port, auth=not no_auth, log=log, progress=bars,
                   access_log=access_log)  # fmt: skip
