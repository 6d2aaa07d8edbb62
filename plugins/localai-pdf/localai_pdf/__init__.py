"""PDF documents for localai's index: the text layer of each page (pypdf), with the page breaks
kept, so that a search hit or a citation says which page it came from.

The loader returns a localai Document (the pages' text joined by form feeds); quotes and line
numbers refer to that text. A PDF that is encrypted, broken or has no text layer (a scan) is
skipped with the reason; nothing here tries OCR.
"""

from __future__ import annotations

import io
from pathlib import Path

import pluggy

hookimpl = pluggy.HookimplMarker("localai")

MAX_PAGES = 5000  # beyond this a "document" is a data dump; skipped with the reason


def load_pdf(data: bytes, path: Path):
    from pypdf import PdfReader

    from localai.index.blocks import Unreadable, pages

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable("encrypted PDF (needs a password)")
        n = len(reader.pages)
        if n > MAX_PAGES:
            raise Unreadable(f"PDF of {n:,} pages (more than {MAX_PAGES:,})")
        texts = [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many types for damaged files; all mean "broken PDF"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Unreadable(f"broken PDF: {first}") from None
    if not any(t.strip() for t in texts):
        raise Unreadable("PDF without a text layer (a scan? OCR is not built in)")
    return pages(texts)


@hookimpl
def localai_register_loaders(register):
    register("pdf", load_pdf, (".pdf",))
