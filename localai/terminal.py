"""Text bound for a terminal that may hold anything a file name or a file can: `shown`.

A file name can carry an escape sequence (set the window title, clear the screen, fake a
prompt), a newline (fake a second result), bidirectional overrides (reorder what is read) or
bytes that are not UTF-8; printed raw, the terminal acts on them. `shown` writes each such
character as its Python escape, so the name stays recognisable and nothing is acted on.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, bidi embeddings/overrides/isolates, lone surrogates (undecodable bytes)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def shown(text: str) -> str:
    """`text` with every character a terminal would act on written as an escape (`\\x1b`)."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
