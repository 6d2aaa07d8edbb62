"""Walking sources: folders → the files to index, and the ones skipped with a reason.

Hidden entries and version-control / build folders are skipped silently; `.gitignore` and
`.localaiignore` files apply to their folder and below, with git's matching rules. Symlinks are
followed, but a folder already on the current path (a loop) is skipped with a reason, as are
unreadable folders, broken links, files over the size limit, FIFOs, sockets and devices, and
names that are not valid UTF-8 (the index stores paths as text). Walking never raises for a
problem with one entry: it yields a `Skipped` and goes on; it keeps its own stack, so a tree of
any depth is walked without recursion.

`read_indexable` applies the same rules when a file is read (indexing it, or reading a passage
back): the file may have become a FIFO, a device or a huge file since it was walked, so it is
checked again on the open descriptor and read with a bound; it never blocks and never reads
more than the limit.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pathspec

MAX_FILE_BYTES = 10 << 20
SKIP_DIRS = {"node_modules", "__pycache__", "CVS", "_darcs", "venv", "site-packages"}
IGNORE_FILES = (".gitignore", ".localaiignore")


@dataclass(frozen=True)
class Found:
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def _ignore_spec(folder: Path) -> pathspec.PathSpec | None:
    lines: list[str] = []
    for name in IGNORE_FILES:
        try:
            lines += (folder / name).read_text(errors="replace").splitlines()
        except OSError:
            continue
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def _ignored(path: Path, is_dir: bool, specs: list[tuple[Path, pathspec.PathSpec]]) -> bool:
    for base, spec in specs:
        rel = path.relative_to(base).as_posix() + ("/" if is_dir else "")
        if spec.match_file(rel):
            return True
    return False


def walk(root: Path, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Found | Skipped]:
    """Every indexable file under `root` (a folder or a single file), in a stable order."""
    root = Path(os.path.abspath(root))
    if bad_name(root):
        yield Skipped(root, BAD_NAME)
        return
    try:
        st = root.stat()
    except OSError as e:
        yield Skipped(root, _why(e))
        return
    if not stat.S_ISDIR(st.st_mode):
        yield _file(root, st, max_bytes)
        return
    yield from _walk_tree(root, st, max_bytes)


@dataclass
class _Folder:
    """One open level of the walk: its remaining entries, ignore rules and the folders above."""

    entries: Iterator[os.DirEntry]
    specs: list[tuple[Path, pathspec.PathSpec]]
    on_path: frozenset  # (st_dev, st_ino) of this folder and those above it: loop detection


def _open_folder(folder: Path, specs: list, on_path: frozenset) -> _Folder | Skipped:
    spec = _ignore_spec(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        return Skipped(folder, _why(e))
    return _Folder(iter(entries), specs + [(folder, spec)] if spec else specs, on_path)


def _walk_tree(root: Path, st: os.stat_result, max_bytes: int) -> Iterator[Found | Skipped]:
    """Depth first, entries sorted by name; a stack of open folders instead of recursion."""
    top = _open_folder(root, [], frozenset({(st.st_dev, st.st_ino)}))
    if isinstance(top, Skipped):
        yield top
        return
    stack = [top]
    while stack:
        level = stack[-1]
        entry = next(level.entries, None)
        if entry is None:
            stack.pop()
            continue
        got = _entry(entry, level, max_bytes)
        if isinstance(got, _Folder):
            stack.append(got)
        elif got is not None:
            yield got


def _entry(entry: os.DirEntry, level: _Folder, max_bytes: int) -> _Folder | Found | Skipped | None:
    """What one folder entry is: a folder to go into, a file, a skip with a reason, or None
    when it is left out silently (hidden, a build folder, an ignore rule)."""
    path = Path(entry.path)
    if entry.name.startswith(".") or entry.name in SKIP_DIRS:
        return None
    if bad_name(entry.name):
        return Skipped(path, BAD_NAME)
    try:
        st = entry.stat()  # follows symlinks
    except OSError as e:
        return Skipped(path, "broken symlink" if entry.is_symlink() else _why(e))
    is_dir = stat.S_ISDIR(st.st_mode)
    if level.specs and _ignored(path, is_dir, level.specs):
        return None
    if not is_dir:
        return _file(path, st, max_bytes)
    key = (st.st_dev, st.st_ino)
    if key in level.on_path:
        return Skipped(path, "symlink loop")
    return _open_folder(path, level.specs, level.on_path | {key})


def excluded(path: Path, root: Path) -> bool:
    """Whether walking `root` would leave `path` out (hidden, VCS/build folder or ignore rule);
    the watcher asks this for single paths, which it does not reach by walking."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if path == root:
        return False
    rel = path.relative_to(root).parts
    if any(part.startswith(".") or part in SKIP_DIRS for part in rel):
        return True
    specs, folder = [], root
    for i, part in enumerate(rel):
        spec = _ignore_spec(folder)
        if spec:
            specs.append((folder, spec))
        folder = folder / part
        is_dir = i < len(rel) - 1 or folder.is_dir()
        if specs and _ignored(folder, is_dir, specs):
            return True
    return False


def _file(path: Path, st: os.stat_result, max_bytes: int) -> Found | Skipped:
    reason = unindexable(st, max_bytes)
    return Skipped(path, reason) if reason else Found(path, st.st_size, st.st_mtime_ns)


def unindexable(st: os.stat_result, max_bytes: int) -> str | None:
    """Why a file with this status is not indexed (None: it is)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file: " + _KINDS.get(stat.S_IFMT(st.st_mode), "unknown kind")
    return _too_big(st.st_size, max_bytes)


def _too_big(size: int, max_bytes: int) -> str | None:
    return f"larger than the {max_bytes >> 20} MB limit" if size > max_bytes else None


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a folder"}  # fmt: skip
BAD_NAME = "the name is not valid UTF-8 (the index keeps paths as text); rename it to index it"


def bad_name(name: str | Path) -> bool:
    """Whether a name holds bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        str(name).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class NotIndexable(Exception):
    """A file that cannot be read as an indexable file now; the message says why."""


def read_indexable(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. The type is checked before the open
    (opening a device can have effects) and again on the descriptor (the path may have been
    swapped meanwhile); O_NONBLOCK keeps a FIFO swapped in between from blocking the open."""
    try:
        _check(os.stat(path), max_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            _check(os.fstat(fd), max_bytes)
            with open(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise NotIndexable(_why(e)) from e
    reason = _too_big(len(data), max_bytes)  # it grew since the fstat
    if reason:
        raise NotIndexable(reason)
    return data


def _check(st: os.stat_result, max_bytes: int) -> None:
    reason = unindexable(st, max_bytes)
    if reason:
        raise NotIndexable(reason)


def _why(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "the file is gone"
    if e.errno == 40:  # ELOOP: too many levels of symbolic links
        return "symlink loop"
    return e.strerror or str(e)
