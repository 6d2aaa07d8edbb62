"""Loaders: which loader reads a file, and localai's own loaders of text formats.

A loader is a function `(data: bytes, path: Path) -> list[Block] | Document` (the contract, and
the helpers loaders share, are in blocks.py), registered for file suffixes (or exact file names)
with `register()`; plugins extend the same registry. localai's own loaders register through the
plugin hook like any plugin's (`register_builtins`), and a plugin registered for the same suffix
takes over from them.

A loader raises `Unreadable(reason)` for a file it cannot use (broken JSON, not UTF-8 ...); the
walker records the reason and moves on. Loaders are pure and deterministic: reading a chunk back
re-runs the loader and the chunker on the current file and compares content hashes.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

from .blocks import (
    Block,
    ByteOffsets,
    Document,
    Unreadable,
    decode,
    pages,  # noqa: F401  (plugins written before blocks.py import it from here)
    paragraphs,
)

Loader = Callable[[bytes, Path], "list[Block] | Document"]
_BY_SUFFIX: dict[str, tuple[str, Loader]] = {}
_BY_NAME: dict[str, tuple[str, Loader]] = {}


def register(name: str, loader: Loader, suffixes=(), filenames=()) -> None:
    """Make `loader` (called `name` in the index) handle these suffixes / exact file names."""
    for s in suffixes:
        _BY_SUFFIX[s.lower()] = (name, loader)
    for f in filenames:
        _BY_NAME[f] = (name, loader)


_plugins_loaded = False


def _load_plugins() -> None:
    """Plugin loaders (hook `localai_register_loaders`) join the registry on first use; a
    broken plugin is recorded by the plugin manager and skipped."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from .. import plugins

    plugins.get().call_each("localai_register_loaders", register=register)


def loader_for(path: Path, head: bytes) -> tuple[str, Loader] | None:
    """The loader for `path`; unknown suffixes are read as plain text if `head` looks textual."""
    _load_plugins()
    found = _BY_NAME.get(path.name) or _BY_SUFFIX.get(path.suffix.lower())
    if found:
        return found
    if not path.suffix or path.suffix.lower() in (".log", ".cfg", ".ini", ".conf"):
        return ("text", load_text) if looks_textual(head) else None
    return None


def load(loader: Loader, data: bytes, path: Path) -> tuple[list[Block], bytes, bool]:
    """(blocks, the bytes their offsets point into, whether pages are counted) for a file."""
    out = loader(data, path)
    if isinstance(out, Document):
        return out.blocks, out.text.encode("utf-8"), out.paged
    return out, data, False


def looks_textual(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end of head is fine
        return e.start >= len(head) - 3
    return True


def load_text(data: bytes, path: Path) -> list[Block]:
    return paragraphs(decode(data))


_MD_FENCE = re.compile(r"^(```|~~~)")
_MD_HEADING = re.compile(r"^#{1,6}\s")


def load_markdown(data: bytes, path: Path) -> list[Block]:
    """Headings and fenced code blocks are their own blocks; the rest splits into paragraphs."""
    text = decode(data)
    to_byte = ByteOffsets(text)
    out: list[Block] = []
    lines = text.splitlines(keepends=True)
    pos, buf_start, fence, fence_start = 0, 0, None, 0

    def flush(upto: int) -> None:
        if upto > buf_start:
            for b in paragraphs(text[buf_start:upto]):
                off = to_byte(buf_start)
                out.append(Block(b.text, b.start + off, b.end + off, b.kind))

    for line in lines:
        nxt = pos + len(line)
        if fence is not None:
            if line.startswith(fence):
                s, e = fence_start, pos + len(line.rstrip())
                out.append(Block(text[s:e], to_byte(s), to_byte(e), "code"))
                fence, buf_start = None, nxt
        elif _MD_FENCE.match(line):
            flush(pos)
            fence, fence_start = line[:3], pos
        elif _MD_HEADING.match(line):
            flush(pos)
            e = pos + len(line.rstrip())
            out.append(Block(text[pos:e], to_byte(pos), to_byte(e), "heading"))
            buf_start = nxt
        pos = nxt
    if fence is not None:  # unclosed fence: the rest of the file is code
        buf_start = fence_start
    flush(len(text))
    out.sort(key=lambda b: b.start)
    return out


_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:.])\1{2,}\s*$")


def load_rst(data: bytes, path: Path) -> list[Block]:
    """Paragraphs; a paragraph ending in an underline (=====, -----) is a heading."""
    blocks = paragraphs(decode(data))
    out = []
    for b in blocks:
        lines = b.text.splitlines()
        if 2 <= len(lines) <= 3 and _RST_UNDERLINE.match(lines[-1]):
            out.append(Block(b.text, b.start, b.end, "heading"))
        elif b.text.startswith(".. code") or b.text.rstrip().endswith("::"):
            out.append(Block(b.text, b.start, b.end, "text"))
        else:
            out.append(b)
    return out


MAX_LINE_CHARS = 5000


def load_code(data: bytes, path: Path) -> list[Block]:
    """Source code: blank-line separated blocks (functions, classes, comment groups).

    Minified or generated code (a search index, a bundle) is one enormous line that no one
    reads and that would flood results with noise: skipped with a reason."""
    text = decode(data)
    longest = max((len(line) for line in text.splitlines()), default=0)
    if longest > MAX_LINE_CHARS:
        raise Unreadable(f"minified or generated code (a line of {longest:,} characters)")
    return paragraphs(text, kind="code")


def load_data(data: bytes, path: Path) -> list[Block]:
    """JSON / TOML / YAML: must parse (a broken file is skipped with the parser's message)."""
    text = decode(data)
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            json.loads(text)
        elif suffix == ".toml":
            tomllib.loads(text)
        else:
            import yaml

            list(yaml.safe_load_all(text))
    except Exception as e:  # each parser has its own error type; all mean "broken file"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Unreadable(f"broken {suffix[1:].upper()}: {first}") from None
    blocks = paragraphs(text, kind="code")
    if len(blocks) == 1 and text.count("\n") > 40:  # one big object: split by lines instead
        blocks = _line_groups(text, 30)
    return blocks


def _line_groups(text: str, n: int) -> list[Block]:
    to_byte = ByteOffsets(text)
    lines = text.splitlines(keepends=True)
    out, pos = [], 0
    for i in range(0, len(lines), n):
        seg = "".join(lines[i : i + n])
        s, e = pos, pos + len(seg.rstrip())
        if text[s:e].strip():
            out.append(Block(text[s:e], to_byte(s), to_byte(e), "code"))
        pos += len(seg)
    return out


_CODE = """.py .pyi .js .mjs .ts .tsx .jsx .c .h .cc .cpp .hpp .rs .go .java .kt .rb .php .swift
.scala .sh .bash .zsh .lua .pl .r .sql .css .scss .el .vim .cs .m .hs .ml .ex .exs .erl .clj .dart
.jl"""
CODE_SUFFIXES = tuple(_CODE.split())
TEXT_SUFFIXES = (".txt", ".text", ".log", ".csv", ".tsv", ".ini", ".cfg", ".conf")
TEXT_NAMES = ("README", "LICENSE", "COPYING", "NOTICE", "CHANGELOG", "AUTHORS", "Makefile")


def register_builtins(register) -> None:
    """localai's own loaders, registered through the plugin hook like any plugin's."""
    from .htmltext import load_html
    from .manpage import load_man

    register("text", load_text, TEXT_SUFFIXES, TEXT_NAMES)
    register("markdown", load_markdown, (".md", ".markdown", ".mdown", ".mkd"))
    register("rst", load_rst, (".rst", ".rest"))
    register("code", load_code, CODE_SUFFIXES)
    register("data", load_data, (".json", ".toml", ".yaml", ".yml"))
    register("html", load_html, (".html", ".htm", ".xhtml"))
    register("man", load_man, tuple(f".{s}" for s in "123456789n") + (".gz",))
