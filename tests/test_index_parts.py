"""Index stages on real files: loaders, walking and skipping, the chunker, the store's schema."""

import json
import os

import numpy as np
import pytest

from localai.index import store
from localai.index.chunker import MAX_TOKENS, chunk, content_hash
from localai.index.htmltext import load_html
from localai.index.loaders import Unreadable, load_markdown, load_text, loader_for
from localai.index.vectors import CODECS, DEFAULT_CODEC, VectorSet, codec
from localai.index.walk import Found, Skipped, excluded, walk


def counter(embedder):
    def count(texts):
        return [
            len(e.ids) for e in embedder.tokenizer.encode_batch(texts, add_special_tokens=False)
        ]

    return count


def test_markdown_blocks_point_at_their_bytes(tmp_path):
    text = "# Título\n\nFirst paragraph — with ünïcode.\n\n```py\nx = 1\n\ny = 2\n```\n\n"
    text += "## Next\ntail\n"
    data = text.encode()
    blocks = load_markdown(data, tmp_path / "a.md")
    kinds = [b.kind for b in blocks]
    assert kinds == ["heading", "text", "code", "heading", "text"]
    for b in blocks:  # exact blocks: the text is exactly the bytes of the range
        assert data[b.start : b.end].decode() == b.text
    assert "y = 2" in blocks[2].text  # a blank line inside a fence does not split the code


def test_html_keeps_visible_text_only(tmp_path):
    html = (
        "<html><head><title>T</title><style>p{}</style></head><body>"
        '<div class="sphinxsidebar">Navigation junk</div><script>var x=1;</script>'
        "<h1>Sorting HOWTO</h1><p>Python lists have a <b>sort()</b> method.</p>"
        "<pre>a = sorted(b)\nprint(a)</pre><nav>menu</nav></body></html>"
    )
    blocks = load_html(html.encode(), tmp_path / "a.html")
    texts = [b.text for b in blocks]
    assert "Sorting HOWTO" in texts and "Python lists have a sort() method." in texts
    assert "a = sorted(b)\nprint(a)" in texts
    joined = " ".join(texts)
    for junk in ("Navigation junk", "var x", "menu", "p{}"):
        assert junk not in joined
    assert all(0 <= b.start < b.end <= len(html) for b in blocks)


def test_unreadable_files_have_reasons(tmp_path):
    with pytest.raises(Unreadable, match="binary"):
        load_text(b"\x00\x01\x02abc", tmp_path / "x.txt")
    with pytest.raises(Unreadable, match="not UTF-8"):
        load_text("café".encode("latin-1"), tmp_path / "x.txt")
    name, load = loader_for(tmp_path / "c.json", b"{")
    with pytest.raises(Unreadable, match="broken JSON"):
        load(b'{"a": ', tmp_path / "c.json")
    assert loader_for(tmp_path / "img.png", b"\x89PNG") is None
    assert loader_for(tmp_path / "notes", b"plain words")[0] == "text"


MAN = """.\\" generated; a comment line
.TH FROB 1 "November 2026" "frob 2.0" "User Commands"
.SH NAME
frob \\- twiddle the \\fBknobs\\fR of a machine
.SH OPTIONS
.TP
\\fB\\-k\\fR, \\fB\\-\\-knob\\fR=\\fINAME\\fR
turn the knob called NAME; it\\(aqs safe
.BR frobrc (5)
.de XX
.if n .ds Q weird
"""


def test_man_pages_plain_or_gzipped(tmp_path):
    import gzip

    page = tmp_path / "frob.1.gz"
    page.write_bytes(gzip.compress(MAN.encode()))
    name, loader = loader_for(page, page.read_bytes()[:4096])
    doc = loader(page.read_bytes(), page)
    assert name == "man" and doc.paged is False
    heads = [b.text for b in doc.blocks if b.kind == "heading"]
    assert heads == ["FROB(1)", "NAME", "OPTIONS"]
    assert "frob - twiddle the knobs of a machine" in doc.text
    assert "-k, --knob=NAME turn the knob called NAME; it's safe frobrc(5)" in doc.text
    assert "\\f" not in doc.text and "weird" not in doc.text and "generated" not in doc.text
    raw = doc.text.encode()
    assert all(raw[b.start : b.end].decode() == b.text for b in doc.blocks)
    log = tmp_path / "app.log.1"  # a rotated log, not a man page: plain text
    log.write_text("started\n\nstopped\n")
    assert [b.text for b in loader_for(log, b"started")[1](log.read_bytes(), log)] == [
        "started",
        "stopped",
    ]
    other = tmp_path / "data.csv.gz"
    other.write_bytes(gzip.compress(b"a,b\n1,2\n"))
    with pytest.raises(Unreadable, match="compressed file"):
        loader_for(other, b"")[1](other.read_bytes(), other)


def test_walk_skips_hidden_ignored_loops_and_big_files(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / ".hidden.md").write_text("no")
    (root / "build").mkdir()
    (root / "build" / "out.txt").write_text("ignored")
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "x.log").write_text("ignored")
    (root / "a.md").write_text("# A")
    (root / "sub" / "b.txt").write_text("b")
    (root / "big.txt").write_bytes(b"x" * 2048)
    os.symlink(root, root / "sub" / "loop")
    os.symlink(root / "missing", root / "dangling.txt")
    items = list(walk(root, max_bytes=1024))
    found = sorted(str(i.path.relative_to(root)) for i in items if isinstance(i, Found))
    skipped = {str(i.path.relative_to(root)): i.reason for i in items if isinstance(i, Skipped)}
    assert found == ["a.md", "sub/b.txt"]
    assert skipped == {
        "big.txt": "larger than the 0 MB limit",
        "dangling.txt": "broken symlink",
        "sub/loop": "symlink loop",
    }


def test_single_paths_follow_the_walk_rules(tmp_path):
    root = tmp_path / "repo"
    (root / "src" / "build").mkdir(parents=True)
    (root / ".gitignore").write_text("build/\n*.tmp\n")
    assert not excluded(root / "src" / "a.md", root)
    assert excluded(root / "src" / "build" / "out.md", root)
    assert excluded(root / "src" / "x.tmp", root)
    assert excluded(root / "src" / ".a.md.swp", root)
    assert excluded(root / ".git" / "index", root)


def test_chunks_fit_the_model_and_map_to_lines(tmp_path, embedder):
    paras = [
        f"Paragraph {i} about topic {i}. " + "More words here. " * (5 + i % 30) for i in range(40)
    ]
    text = "# Guide\n\n" + "\n\n".join(paras) + "\n\n## Appendix\n\n" + "word " * 900 + "\n"
    data = text.encode()
    count = counter(embedder)
    chunks = chunk(load_markdown(data, tmp_path / "g.md"), data, count)
    assert len(chunks) > 5
    for c in chunks:
        assert embedder.count_tokens(c.text) <= MAX_TOKENS + 2  # fits MiniLM's 256 with specials
        assert c.hash == content_hash(c.text)
        first_line = text.splitlines()[c.start_line - 1]
        assert c.text.splitlines()[0].startswith(first_line.strip()[:20])
        assert data[c.start_byte : c.end_byte].decode().startswith(c.text[:40])
    assert any(c.text.startswith("## Appendix") for c in chunks)  # headings open chunks
    # deterministic: the same bytes give the same chunks (read-back relies on it)
    again = chunk(load_markdown(data, tmp_path / "g.md"), data, count)
    assert [c.hash for c in again] == [c.hash for c in chunks]
    sizes = [c.tokens for c in chunks]
    assert sum(sizes) / len(sizes) > 120  # packed, not one tiny chunk per paragraph


def test_migrations_from_blank_and_idempotent(tmp_path):
    path = tmp_path / "index.db"
    db = store.connect(path)
    assert store.schema_version(db) == len(store.MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = [r[0] for r in db.execute("SELECT name FROM migrations ORDER BY version")]
    assert names == [m.__name__ for m in store.MIGRATIONS]
    db.conn.close()
    db = store.connect(path)  # an existing database: nothing to apply
    assert store.migrate(db) == []
    assert store.problems(db, 384) == []


def test_store_keeps_no_text_and_detects_orphans(tmp_path):
    db = store.connect(tmp_path / "index.db")
    secret = "zebracornucopia quietly marmalades the xylophone " * 20
    with store.transaction(db):
        db.execute(
            "INSERT INTO files (id, path, size, mtime_ns, indexed_at) VALUES (1, 'p', 1, 1, 0)"
        )
        store.insert_chunks(db, 1, [(0, 0, 1, 1, 1, b"h" * 16, b"c" * 384)], [secret])
    assert db.execute("SELECT rowid FROM fts WHERE fts MATCH 'zebracornucopia'").fetchall()
    db.conn.close()
    # the inverted index holds terms, never the text itself
    assert b"quietly marmalades" not in (tmp_path / "index.db").read_bytes()
    db = store.connect(tmp_path / "index.db")
    with store.transaction(db):
        store.delete_file_chunks(db, 1)
    assert not db.execute("SELECT rowid FROM fts WHERE fts MATCH 'zebracornucopia'").fetchall()
    db.execute("INSERT INTO fts (rowid, text) VALUES (99, 'orphan')")
    assert store.problems(db, 384) == ["1 FTS rows without a chunk"]


WORDS = ["cats", "dogs", "tax", "law", "sea", "sky"]


def test_q4r_is_closer_to_the_vectors_than_plain_int4_at_the_same_size():
    """Why q4r exists: at int4's 194 bytes, Gaussian-optimal levels after the rotation and a
    least-squares scale keep more of each vector (measured cosine 0.9953 vs 0.9915)."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((500, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    def cosines(name):
        d = codec(name).decode(codec(name).encode(vecs))
        return (d * vecs).sum(1) / np.linalg.norm(d, axis=1)

    assert codec("q4r").nbytes == codec("int4").nbytes == 194
    q4r, int4 = cosines("q4r"), cosines("int4")
    assert q4r.mean() > 0.994 and q4r.min() > 0.985, (q4r.mean(), q4r.min())
    assert q4r.mean() > int4.mean() + 0.002
    assert DEFAULT_CODEC == "q4r"


def test_codecs_keep_ranking(embedder):
    texts = [f"document number {i} about {w}" for i, w in enumerate(WORDS)]
    vecs = embedder.embed(texts)
    q = embedder.embed(["taxes and the law"])[0]
    exact = list(VectorSet(CODECS["f32"], range_ids(6), CODECS["f32"].encode(vecs)).search(q, 3)[0])
    for name in CODECS:
        c = codec(name)
        codes = c.encode(vecs)
        assert codes.shape == (6, c.nbytes)
        got = list(VectorSet(c, range_ids(6), codes).search(q, 3)[0])
        assert got[:2] == exact[:2], name


def test_a_bf16_vector_set_ranks_like_float32_in_half_the_ram():
    """Decoded to bf16 (the default where the CPU has bf16 arithmetic), a q4r vector set finds
    nearly the same top 10 as the same codes decoded to float32, in half the bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 384))
    vecs = centres[rng.integers(0, 40, 4000)] + 0.6 * rng.standard_normal((4000, 384))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    c = codec("q4r")
    codes = c.encode(vecs)
    f32 = VectorSet(c, range_ids(4000), codes, bf16=False)
    bf16 = VectorSet(c, range_ids(4000), codes, bf16=True)
    assert bf16.bf16 and not f32.bf16
    assert bf16.nbytes - bf16.ids.nbytes == (f32.nbytes - f32.ids.nbytes) // 2
    overlap = []
    for q in vecs[rng.integers(0, 4000, 50)] + 0.1 * rng.standard_normal((50, 384)):
        q = (q / np.linalg.norm(q)).astype(np.float32)
        a, sa = f32.search(q, 10)
        b, sb = bf16.search(q, 10)
        overlap.append(len(set(a) & set(b)) / 10)
        assert abs(sa[0] - sb[0]) < 0.02 and list(sb) == sorted(sb, reverse=True)
    assert np.mean(overlap) >= 0.95, np.mean(overlap)
    assert VectorSet(codec("f32"), range_ids(3), codec("f32").encode(vecs[:3])).bf16 is False
    empty = VectorSet(c, range_ids(0), codes[:0], bf16=True)
    assert empty.search(vecs[0], 5)[0].size == 0


def range_ids(n):
    import numpy as np

    return np.arange(n, dtype=np.int64)


def test_json_loader_accepts_valid_data(tmp_path):
    data = json.dumps({"k": list(range(50))}, indent=1).encode()
    name, load = loader_for(tmp_path / "d.json", data)
    blocks = load(data, tmp_path / "d.json")
    assert name == "data" and len(blocks) > 1


def test_index_layer_does_not_reach_up():
    """localai.index is below the engine, the server and RAG: it must not import them."""
    import ast
    from pathlib import Path

    import localai.index

    for path in Path(localai.index.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                up = name.startswith("..")  # relative to localai/, not to localai/index/
                if up or name.startswith("localai."):
                    top = name.lstrip(".").removeprefix("localai.").split(".")[0]
                    assert top not in ("engine", "server", "rag"), (path.name, name)


def test_codec_scores_equal_the_decoded_vectors_products():
    """Codec.scores (the PostgreSQL store ranks candidates with it) is decode(codes) @ query;
    q4r computes it from a per-query table instead of decoding."""
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((64, 384)).astype(np.float32)  # (N, 384)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for c in CODECS.values():
        codes = c.encode(vecs)
        want = c.decode(codes) @ vecs[0]
        assert np.allclose(c.scores(codes, vecs[0]), want, atol=1e-5), c.name
