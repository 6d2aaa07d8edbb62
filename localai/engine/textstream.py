"""Token bytes → text deltas, with stop strings; shared by every backend.

Tokens can end in the middle of a UTF-8 character, and a stop string can arrive split over
several tokens. The streamer emits only whole characters, and holds back any tail of the text
that could still grow into a stop string, so a client never sees part of a stop string.
Invariant: the concatenation of every delta equals `text` (what Done reports).
"""

from __future__ import annotations

import codecs


class TextStreamer:
    def __init__(self, stop: list[str] | None = None):
        self.stop = [s for s in (stop or []) if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""  # all decoded text so far
        self._sent = 0  # how much of _buf has been emitted
        self.stopped = False

    @property
    def text(self) -> str:
        return self._buf[: self._sent] if self.stopped else self._buf

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; returns the text that is now safe to show ("" if none)."""
        assert not self.stopped, "push after a stop string was found"
        self._buf += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush what was held back."""
        if not self.stopped:
            self._buf += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # held-back text means no stop string can start inside what was already sent
        hits = [i for i in (self._buf.find(s, self._sent) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif final:
            end = len(self._buf)
        else:
            end = len(self._buf) - self._held_back()
        out = self._buf[self._sent : end]
        self._sent = max(self._sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._buf)), best, -1):
                if self._buf.endswith(s[:k]):
                    best = k
                    break
        return best
