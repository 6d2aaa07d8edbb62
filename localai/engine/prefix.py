"""Fixed prompt prefixes computed once and kept: in RAM for the loaded engine, and on disk so that
a new process (`localai ask` without a daemon, a restarted daemon) starts from them too.

A prefix is registered by whoever knows a prompt has a fixed head (the RAG answerer: system
message, layout example, up to where the passages go). When a prompt starts with a registered
prefix and the engine's live KV does not already hold it (a chat ran in between, or the process
is new), the engine restores the prefix's snapshot instead of computing it again; the first time,
it computes exactly the prefix, snapshots it, then goes on with the rest of the prompt.

A snapshot is backend bytes (`TokenEngine._snapshot`). On disk each is one file under
`$LOCALAI_HOME/kv/`, mode 0600 (the KV of a system prompt is as private as the prompt), named
for the model, the backend and a hash of everything that makes the bytes valid: the model file's
sha256, the engine's KV configuration, the library version and the prefix tokens themselves (so
a changed layout, system prompt or template is a different file, never a wrong one). The header
repeats the key and the tokens, checked on load; a file that does not match is deleted.

Invariants: a snapshot is only ever restored for a prompt that starts with exactly its tokens;
RAM holds at most MAX_IN_RAM snapshots, and the folder at most MAX_FILES per model and engine
(least recently used go first), so the cache is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..private import safe_name, write_private

MAGIC = b"LOCALAI-KV1\n"
MAX_IN_RAM = 4  # snapshots kept per engine; each is prefix tokens × KV bytes per token
MAX_FILES = 4  # files per model and engine identity (e.g. one per RAG layout in use)


def tokens_key(tokens: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:16]


def model_digest(path: Path) -> str:
    """The model file's sha256 as the catalog recorded it (manifest.json beside it, if its size
    and mtime still match), else a digest of its path, size and mtime: hashing a 1 GB file on
    every start would cost more than the prefix saves."""
    st = path.stat()
    try:
        seen = json.loads((path.parent / "manifest.json").read_text())["files"][path.name]
        if seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
            return seen["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return "stat-" + hashlib.sha256(ident).hexdigest()


@dataclass
class Use:
    """How a request's fixed prefix was obtained: n tokens, from "live" KV (nothing to do),
    "memory", "disk", or "computed" (this request paid for it)."""

    n: int = 0
    source: str = ""


class DiskStore:
    """Snapshots on disk for one model and engine identity (see the module docstring), at most
    `max_files` of them and, if set, `max_bytes` together (least recently used go first)."""

    def __init__(self, folder: Path, model: str, identity: dict, max_files: int = MAX_FILES,
                 max_bytes: int | None = None):  # fmt: skip
        self.folder = Path(folder)
        self.max_files, self.max_bytes = max_files, max_bytes
        self.identity = json.dumps(identity, sort_keys=True)
        ident = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        safe = safe_name(model)
        self.stem = f"{safe}.{ident}"
        self.family = f"{safe}."  # the same model under another identity: stale

    def path(self, tokens: list[int]) -> Path:
        return self.folder / f"{self.stem}.{tokens_key(tokens)}.kv"

    def load(self, tokens: list[int]) -> bytes | None:
        p = self.path(tokens)
        try:
            raw = p.read_bytes()
        except OSError:
            return None
        header, data = _split(raw)
        if (
            header is None
            or header.get("identity") != self.identity
            or (header.get("tokens") != list(tokens))
        ):
            p.unlink(missing_ok=True)  # damaged or a hash collision: never restore it
            return None
        os.utime(p)  # recently used: kept when the folder is pruned
        return data

    def save(self, tokens: list[int], data: bytes) -> Path:
        header = json.dumps({"identity": self.identity, "tokens": list(tokens)}).encode()
        p = self.path(tokens)
        write_private(p, MAGIC + struct.pack("<Q", len(header)) + header + data)
        self._prune()
        return p

    def _prune(self) -> None:
        """Drop files of this model made under another identity (a new model file, KV type or
        library: they can never match again), then the least recently used past the limits."""
        mine = []
        for p in self.folder.glob(f"{self.family}*.kv"):
            ident, _, rest = p.name[len(self.family) :].partition(".")
            if len(ident) != 16 or rest.count(".") != 1:
                continue  # another model whose name starts with this one's
            if not p.name.startswith(self.stem + "."):
                p.unlink(missing_ok=True)
            else:
                mine.append(p)
        sized = []
        for p in mine:
            with contextlib.suppress(OSError):  # another process pruned it first
                st = p.stat()
                sized.append((st.st_mtime, st.st_size, p))
        sized.sort(key=lambda f: f[0], reverse=True)
        total = 0
        for i, (_, size, p) in enumerate(sized):
            total += size
            if i >= self.max_files or (self.max_bytes is not None and total > self.max_bytes):
                p.unlink(missing_ok=True)

    def usage(self) -> dict:
        """Files and bytes this model and identity hold, and the limits."""
        sizes = []
        for p in self.folder.glob(f"{self.stem}.*.kv"):
            with contextlib.suppress(OSError):
                sizes.append(p.stat().st_size)
        return {"files": len(sizes), "bytes": sum(sizes), "max_files": self.max_files,
                "max_bytes": self.max_bytes, "folder": str(self.folder)}  # fmt: skip


def _split(raw: bytes) -> tuple[dict | None, bytes]:
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 8:
        return None, b""
    at = len(MAGIC)
    (n,) = struct.unpack_from("<Q", raw, at)
    try:
        header = json.loads(raw[at + 8 : at + 8 + n])
    except ValueError:
        return None, b""
    return header, raw[at + 8 + n :]


class Prefixes:
    """The registered prefixes of one engine and their snapshots in RAM (LRU)."""

    def __init__(self) -> None:
        self.known: OrderedDict[tuple[int, ...], bytes | None] = OrderedDict()
        self.disk: DiskStore | None = None
        self._lock = threading.Lock()  # registered from request threads while one generates

    def register(self, tokens: list[int]) -> None:
        key = tuple(tokens)
        with self._lock:
            if key in self.known:
                self.known.move_to_end(key)
                return
            self.known[key] = None  # snapshot made on first use
            while len(self.known) > MAX_IN_RAM:
                self.known.popitem(last=False)

    def longest_for(self, tokens: list[int]) -> tuple[int, ...] | None:
        """The longest registered prefix that `tokens` starts with and goes beyond."""
        best = None
        with self._lock:
            for p in self.known:
                longer = len(p) < len(tokens) and (best is None or len(p) > len(best))
                if longer and tuple(tokens[: len(p)]) == p:
                    best = p
        return best

    def snapshot_of(self, prefix: tuple[int, ...]) -> tuple[bytes | None, str]:
        """(bytes, where from) for a registered prefix: RAM, then disk; (None, "") if neither."""
        with self._lock:
            data = self.known.get(prefix)
            if data is not None:
                self.known.move_to_end(prefix)
                return data, "memory"
        if self.disk is not None:
            data = self.disk.load(list(prefix))
            if data is not None:
                with self._lock:
                    self.known[prefix] = data
                return data, "disk"
        return None, ""

    def keep(self, prefix: tuple[int, ...], data: bytes) -> None:
        with self._lock:
            self.known[prefix] = data
        if self.disk is not None:
            # a full or read-only disk costs the next process the prefix, nothing more
            with contextlib.suppress(OSError):
                self.disk.save(list(prefix), data)

    def clear(self) -> None:
        """Forget every prefix and its snapshot in RAM (files stay for the next process)."""
        with self._lock:
            self.known.clear()

    def drop_snapshots(self) -> int:
        """Memory pressure: the snapshots in RAM go (the prefixes stay registered: the next use
        reads the file again, or computes it); the bytes given back."""
        with self._lock:
            freed = self.nbytes
            for key in self.known:
                self.known[key] = None
        return freed

    @property
    def nbytes(self) -> int:
        return sum(len(d) for d in list(self.known.values()) if d)
