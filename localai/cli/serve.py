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
@click.option("--keep-alive", help="Unload the model after this long without requests "
              "(5m, 30s, 1h, seconds; -1 never, 0 after each request).")  # fmt: skip
@click.option("--idle-exit", help="Exit after this long without any request (the TUI's "
              "daemon: daemon_idle_exit); default: run until stopped.")  # fmt: skip
@click.pass_context
@user_errors
def serve(ctx, host, port, model, engine, context_length, threads, type_k, type_v,
          print_token, no_auth, access_log, keep_alive, idle_exit):  # fmt: skip
    """Serve the model over an OpenAI- and Ollama-compatible HTTP API.

    Every route but /health needs `Authorization: Bearer <token>`; the token lives in
    $LOCALAI_HOME/token (mode 0600), and --print-token prints it for editor setup."""
    s = settings_of(ctx, host=host, port=port, model=model, engine=engine,
                    context_length=context_length, threads=threads, type_k=type_k,
                    type_v=type_v, keep_alive=keep_alive)  # fmt: skip
    if print_token:
        click.echo(ensure_token(s.home))
        return
    from ..daemon import serve as run_daemon

    idle_exit_s = _duration(idle_exit, "--idle-exit") if idle_exit else None
    with progress_bars() as bars:
        run_daemon(s, s.host, s.port, auth=not no_auth, log=log, progress=bars,
                   access_log=access_log, idle_exit_s=idle_exit_s)  # fmt: skip


def _duration(text: str, flag: str) -> float | None:
    from ..durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=flag) from e
