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


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, 0600 in a folder created 0700: readers see the old file or the
    whole new one, never a part."""
    path = Path(path)
    private_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    """`name` as a file name part: letters, digits and -_. kept, the rest _, the last 60."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


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
