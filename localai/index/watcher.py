"""Watching: file-system events under the sources → incremental re-index of just those paths.

watchdog reports events from its own thread; they are gathered into a set of paths and, once no
new event has arrived for `debounce` seconds (an editor's save is several events), handed to
`Index.update(paths, keep_missing=False)`: changed files are re-indexed (only changed chunks are
embedded), deleted ones forgotten, and a move indexes the destination before the source is
forgotten, so its embeddings are reused. Paths a walk would leave out (hidden files such as
editor swap files, .git, build folders, ignore-file rules) are ignored here too.
The CLI's `localai index --watch` and the daemon both run this loop; sources added or removed
while it runs are picked up within SOURCES_EVERY seconds.
"""

from __future__ import annotations

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
        p = Path(raw.decode() if isinstance(raw, bytes) else raw)
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

    def take(self, debounce: float) -> list[Path]:
        with self.lock:
            if not self.paths or time.monotonic() - self.last < debounce:
                return []
            out, self.paths = list(self.paths), {}
            return out


SOURCES_EVERY = 2.0  # seconds between looks for sources added or removed meanwhile


def _sync(index, observer, gather: _Gather, handles: dict) -> None:
    """Watch exactly the current sources (the daemon adds sources while watching)."""
    want = {Path(s["path"]) for s in index.sources() if Path(s["path"]).exists()}
    for r in [r for r in handles if r not in want]:
        observer.unschedule(handles.pop(r))
    for r in sorted(want - set(handles)):
        where = str(r if r.is_dir() else r.parent)
        handles[r] = observer.schedule(gather, where, recursive=r.is_dir())
    with gather.lock:
        gather.roots = sorted(want, key=lambda p: -len(p.parts))  # innermost source first


def watch(index, stop: threading.Event, on_update=None, debounce: float = 0.2,
          progress=None) -> None:  # fmt: skip
    """Run until `stop` is set; `on_update(stats)` is called after each re-index, `progress`
    (files done, files to do, chunks) during it."""
    gather = _Gather([])
    observer = Observer()
    handles: dict[Path, object] = {}
    _sync(index, observer, gather, handles)
    observer.start()
    last_sync = time.monotonic()
    try:
        while not stop.wait(0.05):
            paths = gather.take(debounce)
            if paths:
                # destinations of moves were added first, so they are indexed before sources
                # are forgotten: a moved file keeps its embeddings
                stats = index.update(paths, progress=progress, keep_missing=False)
                if on_update:
                    on_update(stats)
            if time.monotonic() - last_sync > SOURCES_EVERY:
                _sync(index, observer, gather, handles)
                last_sync = time.monotonic()
    finally:
        observer.stop()
        observer.join(timeout=5)
