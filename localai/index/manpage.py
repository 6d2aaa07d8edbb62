"""Man pages (roff: `ls.1`, `ls.1.gz`) → the text a reader sees, as a Document.

The page is decompressed when gzipped, requests that only format (`.PP`, `.TP`, `.RS` ...) end
a paragraph, `.SH`/`.SS` (and mdoc's `.Sh`/`.Ss`) become headings, font requests (`.B`, `.IR`
...) keep their words, and inline escapes (`\\fB`, `\\-`, `\\(aq` ...) become plain characters.
Definitions and conditionals (`.de`, `.if`, `.ds` ...) are dropped. Line numbers of hits refer to
this derived text, since a gzipped page has no lines of its own.

A file named like a man page whose first request is not roff (a rotated log, `app.log.1`) is
read as plain text instead; a `.gz` that is not a man page is skipped with the reason.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

from .blocks import Block, Document, Unreadable, decode, paragraphs

MAX_UNPACKED = 16 << 20  # a man page is kilobytes; more than this is not one
_SECTION = re.compile(r"\.[1-9n][a-z]*$")
_BREAKS = frozenset(
    ("PP", "P", "LP", "IP", "TP", "TQ", "HP", "br", "sp", "RS", "RE", "nf", "fi", "in", "ft",
     "ad", "na", "ne", "ti", "EX", "EE", "Pp", "Bl", "El", "It", "Bd", "Ed")
)  # fmt: skip
_FONTS = frozenset(("B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB"))
_HEADINGS = frozenset(["SH", "SS", "Sh", "Ss"])
_NAMED = {"aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "—",
          "en": "–", "hy": "-", "bu": "•", "co": "©", "rg": "®", "ga": "`", "ti": "~",
          "ha": "^", "rs": "\\", "mi": "-", "pl": "+", "mu": "×", "de": "°"}  # fmt: skip
_ESCAPE = re.compile(r"\\(\((..)|\[([^\]]*)\]|f(\(..|\[[^\]]*\]|.)|s[-+]?\d+|\*(\(..|.)|.)")


def _inline(text: str) -> str:
    def one(m: re.Match) -> str:
        named = m.group(2) or m.group(3)
        if named is not None:
            return _NAMED.get(named, "")
        c = m.group(1)[0]
        return {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " ", "\\": "\\"}.get(c, "")

    return _ESCAPE.sub(one, text)


def _args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def _unpack(data: bytes) -> bytes:
    if not data.startswith(b"\x1f\x8b"):
        return data
    try:
        out = zlib.decompressobj(wbits=31).decompress(data, MAX_UNPACKED)
    except (zlib.error, gzip.BadGzipFile, EOFError) as e:
        raise Unreadable(f"broken gzip file: {e}") from None
    if len(out) >= MAX_UNPACKED:
        raise Unreadable(f"unpacks to more than {MAX_UNPACKED >> 20} MiB")
    return out


def is_roff(text: str) -> bool:
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return first[:1] in (".", "'")


def load_man(data: bytes, path: Path):
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if not _SECTION.search(name):
        raise Unreadable("compressed file (only gzipped man pages are read)")
    raw = _unpack(data)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        source = raw.decode("latin-1")  # older pages are Latin-1
    if not is_roff(source):
        if raw is data:
            return paragraphs(decode(data))  # `app.log.1`: plain text (as loaders.load_text)
        raise Unreadable("compressed file that is not a man page")
    return _render(source)


def _render(source: str) -> Document:
    parts: list[tuple[str, str]] = []  # (kind, text) in reading order
    para: list[str] = []

    def end_para() -> None:
        if para:
            parts.append(("text", " ".join(para)))
            para.clear()

    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line in (".", "'"):
            continue
        if line[:1] not in (".", "'"):
            text = _inline(line).strip()
            if text:
                para.append(text)
            continue
        macro, _, rest = line[1:].strip().partition(" ")
        if macro == "TH" or macro == "Dt":
            end_para()
            a = _args(rest)
            parts.append(("heading", f"{a[0]}({a[1]})" if len(a) > 1 else " ".join(a)))
        elif macro in _HEADINGS:
            end_para()
            parts.append(("heading", _inline(" ".join(_args(rest)))))
        elif macro in _BREAKS:
            end_para()
            if macro == "IP" and rest:
                para.append(_inline(_args(rest)[0]))
        elif macro in _FONTS:
            joiner = "" if len(macro) == 2 and macro not in ("SM", "SB") else " "
            text = _inline(joiner.join(_args(rest)))
            if text:
                para.append(text)
        elif macro[:1].isupper() and len(macro) == 2 and macro[1].islower():  # mdoc: keep words
            text = _inline(" ".join(a for a in _args(rest) if not re.fullmatch(r"[A-Z][a-z]", a)))
            if text:
                para.append(text)
    end_para()
    return _document(parts)


def _document(parts: list[tuple[str, str]]) -> Document:
    text = "\n\n".join(t for _, t in parts)
    blocks: list[Block] = []
    pos = 0  # byte offset in the derived text
    for kind, t in parts:
        n = len(t.encode("utf-8"))
        if kind == "heading":
            blocks.append(Block(t, pos, pos + n, "heading"))
        else:
            blocks.extend(Block(b.text, b.start + pos, b.end + pos, b.kind) for b in paragraphs(t))
        pos += n + 2
    return Document(text, blocks, paged=False)
