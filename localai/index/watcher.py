"""Watching: file-system events under the sources → incremental re-index of just those paths.

watchdog reports events from its own thread; they are gathered into a set of paths and, once no
new event has arrived for `debounce` seconds (an editor's save is several events), handed to
`Index.update(paths, keep_missing=False)`: changed files are re-indexed (only changed chunks are
embedded), deleted ones forgotten, and a move indexes the destination before the source is
forgotten, so its embeddings are reused. Paths a walk would leave out (hidden files such as
editor swap files, .git, build folders, ignore-file rules) are ignored here too.
The CLI's `localai index --watch` and the daemon both run this loop; sources added or removed
while it runs are picked up within SOURCES_EVERY seconds. A source that cannot be watched (see
`_sync`) is reported and skipped; the others are watched.

A re-index that fails (the database locked past its 30 s busy timeout by another writer, a full
disk) does not end the watch: its paths go back in the queue, `on_error(error, seconds)` is told,
and the loop tries them again after RETRY seconds (growing while the failures go on), together
with whatever was saved meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .walk import excluded


class _Gather(FileSystemEventHandler):
    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.paths: dict[Path, None] = {}
        self.last = 0.0
        self.lock = threading.Lock()

    def _add(self, raw: str | bytes) -> None:
        p = Path(os.fsdecode(raw))  # a name that is not UTF-8: the walk skips it, saying why
        with self.lock:
            roots = list(self.roots)
        root = next((r for r in roots if p == r or r in p.parents), None)
        if root is None:
            return
        if excluded(p, root):
            return
        with self.lock:
            self.paths[p] = None
            self.last = time.monotonic()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type == "modified":  # a child changed: seen too
            return
        dest = getattr(event, "dest_path", "")
        if dest:
            self._add(dest)
        self._add(event.src_path)

    def put_back(self, paths: list[Path]) -> None:
        """Queue paths again ahead of those gathered since (their order is kept)."""
        with self.lock:
            self.paths = {**dict.fromkeys(paths), **self.paths}

    def take(self, debounce: float) -> list[Path]:
        with self.lock:
            if not self.paths or time.monotonic() - self.last < debounce:
                return []
            out, self.paths = list(self.paths), {}
            return out


SOURCES_EVERY = 2.0  # seconds between looks for sources added or removed meanwhile
RETRY = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before each further try of a failed re-index


class CannotWatch(Exception):
    """A source whose changes cannot be followed; every full update still indexes it."""


def _sync(index, observer, gather: _Gather, handles: dict, on_error=None) -> None:
    """Watch exactly the current sources (the daemon adds sources while watching). A source
    the observer cannot watch (a tree deeper than watchdog's recursive walk can go, the
    system's limit on inotify watches) is reported once and left unwatched; the others are
    watched all the same."""
    want = {Path(s["path"]) for s in index.sources() if Path(s["path"]).exists()}
    for r in [r for r in handles if r not in want]:
        handle = handles.pop(r)
        if handle is not None:
            observer.unschedule(handle)
    for r in sorted(want - set(handles)):
        where = str(r if r.is_dir() else r.parent)
        try:
            handles[r] = observer.schedule(gather, where, recursive=r.is_dir())
        except (OSError, RecursionError) as e:
            handles[r] = None  # not tried again while it stays a source
            why = "the folder tree is too deep" if isinstance(e, RecursionError) else str(e)
            if on_error:
                on_error(CannotWatch(f"cannot follow changes under {r} ({why}); "
                                     "`localai index` still indexes it"), None)  # fmt: skip
    with gather.lock:
        gather.roots = sorted(want, key=lambda p: -len(p.parts))  # innermost source first


def failure(e: Exception, retry_in: float | None) -> str:
    """What a watcher says when a re-index failed and will be tried again (retry_in None: a
    source it cannot watch)."""
    if retry_in is None:
        return str(e)
    return f"re-indexing failed ({type(e).__name__}: {e}); trying again in {retry_in:g} s"


def watch(index, stop: threading.Event, on_update=None, debounce: float = 0.2,
          progress=None, on_error=None) -> None:  # fmt: skip
    """Run until `stop` is set; `on_update(stats)` is called after each re-index, `progress`
    (files done, files to do, chunks) during it, `on_error(exception, retry_in_seconds)`
    after a re-index that failed and will be tried again, or with None for a source that
    cannot be watched."""
    gather = _Gather([])
    observer = Observer()
    handles: dict[Path, object] = {}
    observer.start()  # first: then each source's watch starts (or fails) on its own
    _sync(index, observer, gather, handles, on_error)
    last_sync = time.monotonic()
    failures = 0
    try:
        while not stop.wait(0.05):
            paths = gather.take(debounce)
            if paths:
                # destinations of moves were added first, so they are indexed before sources
                # are forgotten: a moved file keeps its embeddings
                try:
                    stats = index.update(paths, progress=progress, keep_missing=False)
                except Exception as e:  # noqa: BLE001  (told, and tried again)
                    gather.put_back(paths)
                    delay = RETRY[min(failures, len(RETRY) - 1)]
                    failures += 1
                    if on_error:
                        on_error(e, delay)
                    stop.wait(delay)
                    continue
                failures = 0
                if on_update:
                    on_update(stats)
            if time.monotonic() - last_sync > SOURCES_EVERY:
                _sync(index, observer, gather, handles, on_error)
                last_sync = time.monotonic()
    finally:
        observer.stop()
        observer.join(timeout=5)
