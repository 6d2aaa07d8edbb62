"""How the index names paths: what a person typed (`~/docs`, `c/../c`) → the absolute path the
walk records, so that a source, a `--remove`, a search's `under` and a watched file all name a
file the same way."""

from __future__ import annotations

import os
from pathlib import Path

from . import IndexError_
from .walk import BAD_NAME, bad_name


def user_path(raw: str | Path, what: str = "path") -> Path:
    """`raw` as the index names paths: `~` expanded, absolute, `.` and `..` resolved by name as
    the walk resolves them (symlinks kept), so `c/../c` is the source `c`. An unknown `~user`,
    a NUL or a name that is not UTF-8 is an IndexError_ saying so, never a traceback."""
    p = normal_path(raw, what)
    if bad_name(p):
        raise IndexError_(f"{what}: {str(raw)!r}: {BAD_NAME}")
    return p


def normal_path(raw: str | Path, what: str) -> Path:
    """user_path without the UTF-8 check, for paths the walk reports on (watched files)."""
    if "\0" in str(raw):
        raise IndexError_(f"{what}: {str(raw)!r}: a path cannot hold a NUL character")
    try:
        return Path(os.path.abspath(Path(raw).expanduser()))
    except RuntimeError as e:  # "~someone" who is not a user here
        raise IndexError_(f"{what}: cannot expand ~ in {str(raw)!r}: no such user") from e
