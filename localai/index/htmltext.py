"""HTML loader: visible text only, one block per block-level element, with its byte range.

Scripts, styles and page furniture (nav, header, footer, sidebars, "related" bars) are dropped so
that chunks hold the document, not the site around it. Whitespace is collapsed outside <pre>.
Blocks are inexact: their text is derived from the byte range, not equal to it.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from .blocks import Block, ByteOffsets, decode

BLOCK_TAGS = {"p", "div", "section", "article", "main", "li", "dt", "dd", "pre", "blockquote",
              "table", "tr", "td", "th", "ul", "ol", "dl", "h1", "h2", "h3", "h4", "h5", "h6",
              "br", "hr", "title", "figcaption", "caption", "body"}  # fmt: skip
SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "head"}
SKIP_CLASS = re.compile(r"\b(sphinxsidebar|related|footer|navigation|nav|sidebar|headerlink)\b")
VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
        "track", "wbr", "param"}  # fmt: skip
_WS = re.compile(r"\s+")


class _Extractor(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.to_byte = ByteOffsets(text)
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.blocks: list[Block] = []
        self.parts: list[str] = []
        self.start: int | None = None
        self.kind = "text"
        self.skip: list[str] = []  # tag names whose element we are inside and dropping
        self.pre = 0

    def _pos(self) -> int:
        line, col = self.getpos()
        return self.to_byte(self.line_starts[line - 1] + col)

    def _flush(self) -> None:
        raw = "".join(self.parts)
        text = raw.strip("\n") if self.kind == "code" else _WS.sub(" ", raw).strip()
        if text and self.start is not None:
            end = max(self._pos(), self.start + 1)
            self.blocks.append(Block(text, self.start, end, self.kind, exact=False))
        self.parts, self.start, self.kind = [], None, "text"

    def handle_starttag(self, tag, attrs):
        if self.skip:
            if tag == self.skip[-1] and tag not in VOID:
                self.skip.append(tag)
            return
        a = dict(attrs)
        if (
            tag in SKIP_TAGS
            or a.get("role") == "navigation"
            or (SKIP_CLASS.search(a.get("class") or "") and tag not in VOID)
        ):
            if tag not in VOID:
                self._flush()
                self.skip.append(tag)
            return
        if tag in BLOCK_TAGS:
            self._flush()
            if tag == "pre":
                self.pre += 1
                self.kind = "code"
            elif tag in ("h1", "h2", "h3", "h4", "h5", "h6", "title"):
                self.kind = "heading"

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
                if not self.skip:
                    self.parts, self.start = [], None
            return
        if tag in BLOCK_TAGS:
            self._flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.skip:
            return
        if self.start is None:
            if not data.strip():
                return
            self.start = self._pos()
            if self.pre:
                self.kind = "code"
        self.parts.append(data)


def load_html(data: bytes, path: Path) -> list[Block]:
    text = decode(data)
    p = _Extractor(text)
    p.feed(text)
    p.close()
    p._flush()
    return p.blocks
