"""Passage KV kept across requests: the KV of a registered run of prompt tokens (a RAG passage),
stored the first time a prompt computes it and put back into any later prompt that holds the same
tokens after its fixed prefix (prefix.py), at whatever position the run sits there.

A run's KV depends on what came before it when it was computed (the layout's head, the passages
ranked before it) and on its position. Put back, it keeps the first and is moved to its new
position (the backend rotates its keys: llama.cpp's sequence position shift). So a prompt made of
stored passages is not that prompt computed whole: a stored passage has not seen the passages
now before it (what parallel-encoding methods accept). Everything between and after the stored
runs (the citation labels, the question) is computed as usual and sees all of them. What that
costs in answers is measured by bench/rag.py --part ttft (BENCHMARKS.md, "RAG time to first
token").

Storage: one file per run under $LOCALAI_HOME/kv/passages/, mode 0600, keyed like a prefix
(model sha256, KV configuration, library version and the run's tokens: prefix.DiskStore), holding
the position the run was computed at and the backend's bytes; the folder stays under a byte
budget (config `passage_kv_bytes`), least recently used first. With no folder nothing is kept.

With `exact` set (config `passage_kv_reuse = "exact"`, the default: moved passages cost
verified citations in BENCHMARKS.md), a run is keyed by every token up to its end instead: it is
put back only after the very tokens it was computed after, at its position, so the prompt's KV
is the one computing it whole would give (a question asked again in a new process, a new
question whose passages come in the same order); a passage that moved is computed.

Invariant: a run is put back only where the prompt holds exactly its tokens (and, exact, all
tokens before them).
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .prefix import DiskStore

MIN_TOKENS = 16  # a shorter run costs about what putting it back does (one more batch)
MAX_KNOWN = 64  # runs registered at once (a request registers its own, up to k)
_AT = struct.Struct("<q")


@dataclass
class PieceUse:
    """What a request's registered runs cost: tokens put back from the store, and tokens the
    request computed before its first sampled token while placing them (stored for next time)."""

    loaded: int = 0
    computed: int = 0


class Pieces:
    """The registered runs of one engine, and their store (see the module docstring)."""

    def __init__(self) -> None:
        self.known: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self.disk: DiskStore | None = None
        self.exact = False  # put a run back only after the tokens it was computed after
        self._lock = threading.Lock()  # registered from request threads while one generates

    def register(self, runs: list[list[int]]) -> None:
        with self._lock:
            for run in runs:
                if len(run) >= MIN_TOKENS:
                    self.known[tuple(run)] = None
                    self.known.move_to_end(tuple(run))
            while len(self.known) > MAX_KNOWN:
                self.known.popitem(last=False)

    def clear(self) -> None:
        """Forget every registered run (the files stay for the next request that names them)."""
        with self._lock:
            self.known.clear()

    def find(self, tokens: list[int], start: int) -> list[tuple[int, int]]:
        """[a, b) of each registered run that `tokens` holds at or after `start`, in order and
        not overlapping (the first occurrence of each)."""
        if self.disk is None:
            return []
        where: dict[int, list[int]] = {}
        for i in range(start, len(tokens)):
            where.setdefault(tokens[i], []).append(i)
        found = []
        with self._lock:
            runs = list(self.known)
        for run in runs:
            for a in where.get(run[0], ()):
                if tuple(tokens[a : a + len(run)]) == run:
                    found.append((a, a + len(run)))
                    break
        found.sort()
        out: list[tuple[int, int]] = []
        for a, b in found:
            if not out or a >= out[-1][1]:
                out.append((a, b))
        return out

    def _key(self, tokens: list[int], a: int, b: int) -> list[int]:
        return tokens[:b] if self.exact else tokens[a:b]

    def load(self, tokens: list[int], a: int, b: int) -> tuple[int, bytes] | None:
        """For the run tokens[a:b]: (the position it was computed at, the backend's bytes)."""
        data = self.disk.load(self._key(tokens, a, b)) if self.disk is not None else None
        if data is None or len(data) < _AT.size:
            return None
        return _AT.unpack_from(data)[0], data[_AT.size :]

    def save(self, tokens: list[int], a: int, b: int, data: bytes) -> None:
        """Keep the KV of the run tokens[a:b], computed at position a."""
        if self.disk is not None:
            # a full or read-only disk costs the next question this passage, nothing more
            with contextlib.suppress(OSError):
                self.disk.save(self._key(tokens, a, b), _AT.pack(a) + data)

    def usage(self) -> dict:
        return self.disk.usage() if self.disk is not None else {}
