"""GGUF metadata as a plain dict (scalars and strings; large arrays such as the vocabulary are
left out), read with the `gguf` package over a memory map, so no tensor data is touched."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from gguf import GGUFReader, GGUFValueType

MAX_ARRAY = 64  # arrays longer than this (token lists, merges) are not copied into the dict


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int) -> dict:
    reader = GGUFReader(path, "r")
    out: dict = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        types = field.types
        if not types:
            continue
        if types[0] == GGUFValueType.ARRAY:
            if len(field.data) <= MAX_ARRAY:
                out[key] = [field.contents(i) for i in range(len(field.data))]
        else:
            out[key] = field.contents()
    arch = out.get("general.architecture", "llama")
    out["arch"] = arch
    out["context_length"] = out.get(f"{arch}.context_length")
    return out


def read(path: Path) -> dict:
    p = Path(path)
    return dict(_read(str(p), p.stat().st_mtime_ns))
