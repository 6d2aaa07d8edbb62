"""Walking sources: folders → the files to index, and the ones skipped with a reason.

Hidden entries and version-control / build folders are skipped silently; `.gitignore` and
`.localaiignore` files apply to their folder and below, with git's matching rules. Symlinks are
followed, but a folder already on the current path (a loop) is skipped with a reason, as are
unreadable folders, broken links and files over the size limit. Walking never raises for a
problem with one entry: it yields a `Skipped` and goes on.
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
    try:
        st = root.stat()
    except OSError as e:
        yield Skipped(root, _why(e))
        return
    if not stat.S_ISDIR(st.st_mode):
        yield _file(root, st, max_bytes)
        return
    yield from _walk_dir(root, [], {(st.st_dev, st.st_ino)}, max_bytes)


def _walk_dir(folder: Path, specs, on_path: set, max_bytes: int) -> Iterator[Found | Skipped]:
    spec = _ignore_spec(folder)
    specs = specs + [(folder, spec)] if spec else specs
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        yield Skipped(folder, _why(e))
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith(".") or entry.name in SKIP_DIRS:
            continue
        try:
            st = entry.stat()  # follows symlinks
        except OSError as e:
            yield Skipped(path, "broken symlink" if entry.is_symlink() else _why(e))
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if specs and _ignored(path, is_dir, specs):
            continue
        if is_dir:
            key = (st.st_dev, st.st_ino)
            if key in on_path:
                yield Skipped(path, "symlink loop")
                continue
            yield from _walk_dir(path, specs, on_path | {key}, max_bytes)
        elif stat.S_ISREG(st.st_mode):
            yield _file(path, st, max_bytes)


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
    if not stat.S_ISREG(st.st_mode):
        return Skipped(path, "not a regular file")
    if st.st_size > max_bytes:
        return Skipped(path, f"larger than the {max_bytes >> 20} MB limit")
    return Found(path, st.st_size, st.st_mtime_ns)


def _why(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == 40:  # ELOOP: too many levels of symbolic links
        return "symlink loop"
    return e.strerror or str(e)
