"""Files only this user can read: the data directory (0700) and what localai keeps in it (0600).

The index names every indexed path and its FTS vocabulary gives back the terms of every file;
the token, the conversations and the daemon's log are no one else's business either. Each is
created with its mode (umask can only narrow it), and a file an older version left readable by
others is tightened when it is next opened. Folders that exist already keep their mode: the
home may be a folder the user chose.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(path: Path) -> Path:
    """`path` as a folder, created 0700 if missing (missing parents get the usual mode)."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def private_file(path: Path) -> bool:
    """Make sure `path` exists and only its owner can read it; True if it was created (empty)."""
    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return True
    except FileExistsError:
        tighten(path)
        return False


def tighten(path: Path) -> None:
    """Take group and other permissions off an existing file (missing: nothing to do)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except FileNotFoundError:
        pass
