"""The loader contract: what every loader (built-in or a plugin's) returns, and the helpers
they share to build it.

A loader turns a file's bytes into `Block`s, each one structural unit (heading, paragraph, code
block, list item) with the byte range it came from. When `exact` is true the block's text is
exactly the UTF-8 decoding of `data[start:end]`, so the chunker may split it at any character and
still compute byte offsets (`ByteOffsets`); markup loaders (HTML) produce inexact blocks whose
text is derived from the range. Loaders of binary formats return a `Document` instead (see
there). A file a loader cannot use raises `Unreadable(reason)`.

This module imports nothing of localai's: the registry (loaders.py), every loader and the
chunker import it, and it imports none of them.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass


class Unreadable(ValueError):
    """The file cannot be indexed; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Block:
    text: str
    start: int  # byte offset in the file
    end: int
    kind: str = "text"  # "heading", "text" or "code"
    exact: bool = True


@dataclass(frozen=True)
class Document:
    """What a loader of a binary format (PDF, ...) returns: the text it derived from the file,
    pages separated by form feeds, and exact blocks whose offsets point into that text's UTF-8
    bytes. Lines and quotes then refer to the derived text, and citations name pages."""

    text: str
    blocks: list[Block]
    paged: bool = True


def pages(texts: list[str]) -> Document:
    """A Document from the text of each page, split into paragraphs."""
    text = "\f".join(t.replace("\f", " ") for t in texts)
    return Document(text, paragraphs(text))


def decode(data: bytes) -> str:
    if b"\0" in data[:8192]:
        raise Unreadable("binary file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 text (byte {e.start})") from None


class ByteOffsets:
    """Character offset → byte offset in a decoded text, computed incrementally per line."""

    def __init__(self, text: str):
        self.text = text
        self.ascii = text.isascii()
        self._line_chars = [0]
        self._line_bytes = [0]
        if not self.ascii:
            for m in re.finditer("\n", text):
                c = m.end()
                b = self._line_bytes[-1] + len(text[self._line_chars[-1] : c].encode())
                self._line_chars.append(c)
                self._line_bytes.append(b)

    def __call__(self, i: int) -> int:
        if self.ascii:
            return i
        k = bisect.bisect_right(self._line_chars, i) - 1
        c0 = self._line_chars[k]
        return self._line_bytes[k] + len(self.text[c0:i].encode())


_PARA = re.compile(r"\n[ \t]*\n|\f")  # a blank line, or a page break


def paragraphs(text: str, kind: str = "text") -> list[Block]:
    """Blank-line separated paragraphs as exact blocks."""
    to_byte = ByteOffsets(text)
    out, pos = [], 0
    for m in [*_PARA.finditer(text), None]:
        end = m.start() if m else len(text)
        piece = text[pos:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            s, e = pos + lead, pos + len(piece.rstrip())
            out.append(Block(text[s:e], to_byte(s), to_byte(e), kind))
        if m:
            pos = m.end()
    return out
