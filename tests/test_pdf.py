"""The bundled PDF loader plugin (plugins/localai-pdf, installed by `make`) through its entry point:
real PDFs written with fpdf2 are indexed with `localai index`, found by `localai search` with the
page they are on, cited by page in answers, and broken, scanned or encrypted PDFs are skipped
with a reason."""

from __future__ import annotations

import json

import pytest
from conftest import localai

from localai import plugins
from localai.index import loaders

fpdf = pytest.importorskip("fpdf", reason="fpdf2 is in the test extra")

PAGES = [
    "Harbour logbook. The north pier was repaired in March after the winter storms.",
    "Tide tables. The lighthouse keeper Ottoline Vasquez records the spring tide at "
    "4.7 metres every equinox, measured against the old granite gauge.",
    "Supplies. Lamp oil is delivered by the ferry on the first Monday of each month.",
]


def write_pdf(path, pages: list[str]) -> None:
    doc = fpdf.FPDF()
    doc.set_font("helvetica", size=12)
    for text in pages:
        doc.add_page()
        doc.multi_cell(0, 8, text)
    doc.output(str(path))


def test_plugin_is_loaded_through_its_entry_point():
    info = {p["name"]: p for p in plugins.get().report()}
    assert info["pdf"]["source"].startswith("localai-pdf ")
    assert info["pdf"]["hooks"] == ["localai_register_loaders"] and not info["pdf"]["errors"]
    # the built-in loaders come through the same hook
    assert "localai_register_loaders" in info["builtin"]["hooks"]


def test_loader_keeps_pages(tmp_path):
    path = tmp_path / "log.pdf"
    write_pdf(path, PAGES)
    name, loader = loaders.loader_for(path, path.read_bytes()[:4096])
    assert name == "pdf"
    doc = loader(path.read_bytes(), path)
    assert doc.text.count("\f") == 2 and "Ottoline Vasquez" in doc.text.split("\f")[1]
    raw = doc.text.encode()
    assert all(raw[b.start : b.end].decode() == b.text for b in doc.blocks)


def run(*args: str) -> str:
    r = localai(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_index_search_and_skips(tmp_path, home, embedder):
    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "harbour.pdf", PAGES)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 50)
    scan = fpdf.FPDF()
    scan.add_page()
    scan.rect(20, 20, 100, 100, style="F")  # a page with no text layer, like a scan
    scan.output(str(docs / "scan.pdf"))
    (docs / "notes.md").write_text("# Notes\n\nThe ferry also brings the post.\n")

    out = json.loads(run("index", str(docs), "--json"))
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in out["skipped"]}
    assert reasons["broken.pdf"].startswith("broken PDF")
    assert "text layer" in reasons["scan.pdf"]
    assert out["files"] >= 2

    hits = json.loads(run("search", "spring tide lighthouse keeper", "--json"))
    top = hits[0]
    assert top["path"].endswith("harbour.pdf") and top["verified"]
    assert "Ottoline Vasquez" in top["text"]
    assert 2 in range(top["pages"][0], top["pages"][1] + 1)
    assert top["where"].startswith(str(docs / "harbour.pdf") + " p.")
    text = run("search", "spring tide lighthouse keeper")
    assert "harbour.pdf p." in " ".join(text.split())  # the terminal may wrap the line

    # a rewritten PDF: the old passage is no longer served as verified
    write_pdf(docs / "harbour.pdf", [PAGES[0], "The page was replaced.", PAGES[2]])
    hits = json.loads(run("search", "spring tide lighthouse keeper", "--json"))
    stale = [h for h in hits if h["path"].endswith("harbour.pdf") and "Vasquez" in h["text"]]
    assert all(not h["verified"] for h in stale)
