"""The document index end to end: real files, the real MiniLM model, a real sqlite file."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import localai

from localai.config import load_settings
from localai.index import IndexError_
from localai.index.facade import Index

TOPICS = {
    "bread": "Knead the dough with flour, water, salt and yeast, then let it rise until doubled.",
    "starter": "A sourdough starter is flour and water fermented by wild yeast; feed it daily.",
    "tomato": "Tomato plants need full sun, deep watering and a stake to climb as they grow.",
    "taxes": "File your income tax return before the April deadline to avoid late penalties.",
    "bikes": "Keep the bicycle chain clean and oiled, and check tyre pressure every week.",
    "stars": "Astronomers measure the distance to nearby stars with parallax over a year.",
    "violin": "Rosin the violin bow before practice so the strings speak clearly.",
    "cheese": "Cheddar cheese is aged for months in cool caves to develop its sharp flavour.",
}


def section(title: str, sentence: str, n: int = 9) -> str:
    body = " ".join(f"{sentence} (note {i})" for i in range(n))
    return f"## {title}\n\n{body}\n"


def write_docs(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "kitchen.md").write_text(
        "# Kitchen notes\n\n"
        + section("Baking bread", TOPICS["bread"])
        + "\n"
        + section("Sourdough starter", TOPICS["starter"])
    )
    (root / "garden.html").write_text(
        "<html><body><nav>Home | About</nav><h1>Growing tomatoes</h1>"
        f"<p>{TOPICS['tomato']}</p><p>Pick them when red.</p></body></html>"
    )
    (root / "money.txt").write_text(TOPICS["taxes"] + "\n\nKeep receipts for seven years.\n")
    (root / "long.md").write_text(
        "\n".join(section(t, s) for t, s in TOPICS.items() if t in ("bikes", "stars", "violin"))
    )
    (root / "fib.py").write_text("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
                                 "        a, b = b, a + b\n    return a\n")  # fmt: skip
    (root / "broken.json").write_text('{"name": ')
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


@pytest.fixture
def docs(tmp_path):
    write_docs(tmp_path / "docs")
    return tmp_path / "docs"


@pytest.fixture
def index(home, embedder):
    ix = Index.open(load_settings(), embedder=embedder)
    yield ix
    ix.close()


def test_index_search_and_read_back(index, docs):
    assert index.search("anything at all", k=5) == []  # an empty index answers, it does not fail
    index.add_source(docs)
    st = index.update()
    assert st.files == 5 and st.chunks >= 6 and st.embedded == st.chunks
    reasons = {os.path.basename(s["path"]): s["reason"] for s in st.skipped}
    assert reasons["broken.json"].startswith("broken JSON")
    assert reasons["photo.png"] == "binary or unknown file type"
    assert 0 < st.text_bytes < st.index_bytes  # tiny corpus: sqlite's fixed pages dominate
    hits = index.search("how do I feed a sourdough starter", k=3)
    top = index.read(hits[0])
    assert hits[0].path.endswith("kitchen.md") and "sourdough starter" in top.text
    assert top.verified and top.reason == ""
    lines = (docs / "kitchen.md").read_text().splitlines()
    assert "Sourdough" in "\n".join(lines[hits[0].start_line - 1 : hits[0].end_line])
    assert index.search("tomato sun watering", k=1)[0].path.endswith("garden.html")
    assert index.search("fibonacci", k=1, mode="bm25")[0].path.endswith("fib.py")
    assert index.search("astronomy and distant suns", k=1, mode="vector")[0].path.endswith(
        "long.md"
    )
    assert index.search("?!", k=3, mode="bm25") == []  # no words: no BM25 query, no error
    files = index.search("yeast", k=10, unit="file")
    assert len({h.path for h in files}) == len(files)
    with pytest.raises(IndexError_):
        index.search("x", unit="page")
    assert index.check() == []


def test_incremental_reindex_embeds_only_what_changed(index, docs):
    # enough files that per-file work, not the fixed cost of a run, sets the no-op ratio below
    (docs / "notes").mkdir()
    for i in range(40):
        (docs / "notes" / f"bike-{i}.md").write_text(
            f"# Ride {i}\n\n{section('Bikes', TOPICS['bikes'], 4)}"
        )
    index.add_source(docs)
    first = index.update()
    noop = index.update()
    assert (noop.changed, noop.embedded, noop.removed) == (0, 0, 0)
    assert noop.unchanged == first.changed + 2  # the two skipped files are remembered too
    assert noop.seconds < 0.05 * first.seconds  # same run, same machine: a ratio, not a clock
    long_md = docs / "long.md"
    before = index.stats()["chunks"]
    text = long_md.read_text().replace("parallax over a year", "parallax over six months")
    long_md.write_text(text)
    st = index.update()
    assert st.changed == 1 and 0 < st.embedded < 4 and st.reused >= 1
    assert index.stats()["chunks"] == before
    os.utime(docs / "money.txt", ns=(1, 1))  # touched, not changed: hashed, not re-embedded
    assert index.update().embedded == 0
    (docs / "sub").mkdir()
    (docs / "kitchen.md").rename(docs / "sub" / "recipes.md")  # a move re-uses embeddings
    st = index.update()
    assert st.embedded == 0 and st.removed == 1 and st.changed == 1
    assert index.search("sourdough starter", k=1)[0].path.endswith("sub/recipes.md")
    (docs / "money.txt").unlink()
    st = index.update()
    assert st.removed == 1 and not any(
        h.path.endswith("money.txt") for h in index.search("income tax deadline", k=10)
    )
    assert index.check() == []
    # FTS rows can be re-fed from the files (after a change to what FTS is given)
    assert index.refeed_fts() == index.stats()["chunks"]
    assert index.check() == []
    assert index.search("sourdough", k=1, mode="bm25")[0].path.endswith("recipes.md")


def test_read_says_when_the_file_changed(index, docs):
    index.add_source(docs)
    index.update()
    hit = index.search("income tax return deadline", k=1)[0]
    assert hit.path.endswith("money.txt")
    (docs / "money.txt").write_text("Completely different words now.\n")
    p = index.read(hit)
    assert not p.verified and "changed since it was indexed" in p.reason
    (docs / "money.txt").unlink()
    assert index.read(hit).reason == "the file is gone"


def test_remove_source_and_missing_source(index, docs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "violin.md").write_text(section("Violin", TOPICS["violin"]))
    index.add_source(docs)
    index.add_source(other)
    index.update()
    assert {s["path"] for s in index.sources()} == {str(docs), str(other)}
    only = index.search("violin bow rosin", k=10, under=other)
    assert only and all(h.path.startswith(str(other) + "/") for h in only)
    assert all(not h.path.startswith(str(other)) for h in index.search("violin", under=docs))
    assert index.remove_source(other) == 1
    assert all(not h.path.startswith(str(other)) for h in index.search("violin bow", k=10))
    with pytest.raises(IndexError_, match="not a source"):
        index.remove_source(other)
    with pytest.raises(IndexError_, match="does not exist"):
        index.add_source(tmp_path / "nope")
    docs.rename(tmp_path / "unmounted")  # a missing source keeps its files (maybe unmounted)
    st = index.update()
    assert st.removed == 0 and st.files == 5
    assert any("source is missing" in s["reason"] for s in st.skipped)


def test_watch_makes_a_saved_file_searchable(index, docs):
    index.add_source(docs)
    index.update()
    stop = threading.Event()
    updates = []
    t = threading.Thread(target=index.watch, args=(stop,), kwargs={"on_update": updates.append})
    t.start()
    try:
        time.sleep(0.5)  # let the observer start
        (docs / "cheese.md").write_text(section("Cheese", TOPICS["cheese"]))
        deadline = time.monotonic() + 60  # generous: a loaded CI machine, not a speed assert
        found = False
        while time.monotonic() < deadline and not found:
            time.sleep(0.2)
            found = any(h.path.endswith("cheese.md") for h in index.search("aged cheddar", k=3))
        assert found, updates
        (docs / "cheese.md").unlink()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and found:
            time.sleep(0.2)
            found = any(h.path.endswith("cheese.md") for h in index.search("aged cheddar", k=3))
        assert not found
        other = docs.parent / "later"  # a source added while watching (as the daemon does)
        other.mkdir()
        index.add_source(other)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not found:
            (other / "violin.md").write_text(section("Violin", TOPICS["violin"]))  # re-saved
            for _ in range(25):  # until the watcher has picked the new source up
                time.sleep(0.2)
                found = any(h.path.startswith(str(other)) for h in index.search("rosin bow", k=3))
                if found:
                    break
        assert found
    finally:
        stop.set()
        t.join(timeout=30)
    assert index.check() == []


def test_watch_retries_a_re_index_that_found_the_database_locked(index, docs, monkeypatch):
    """Another writer holds the database past the busy timeout: the watcher says so, keeps
    watching, and indexes the saved file once the lock is gone."""
    import pysqlite3.dbapi2 as sqlite3

    from localai.index import store, watcher

    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(watcher, "RETRY", (0.5,))
    index.add_source(docs)
    index.update()
    blocker = sqlite3.connect(str(index.path), isolation_level=None)
    stop = threading.Event()
    errors, retried = [], threading.Event()

    def failed(e, retry_in):
        errors.append((str(e), retry_in))
        retried.set()

    t = threading.Thread(target=index.watch, args=(stop,), kwargs={"on_error": failed})
    t.start()
    try:
        time.sleep(0.5)  # let the observer start
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        (docs / "cheese.md").write_text(section("Cheese", TOPICS["cheese"]))
        assert retried.wait(60), "the re-index never failed: the test proves nothing"
        assert t.is_alive() and errors[0] == ("database is locked", 0.5)
        assert not any(h.path.endswith("cheese.md") for h in index.search("aged cheddar", k=3))
        blocker.execute("ROLLBACK")
        deadline = time.monotonic() + 60
        found = False
        while time.monotonic() < deadline and not found:
            time.sleep(0.2)
            found = any(h.path.endswith("cheese.md") for h in index.search("aged cheddar", k=3))
        assert found, errors
    finally:
        stop.set()
        t.join(timeout=30)
        blocker.close()
    assert index.check() == []


def test_daemon_watcher_catches_up_once_the_database_is_free(index, docs, monkeypatch):
    """The daemon's first catch-up finds another writer holding the database: it logs why,
    waits, tries again, and then indexes and watches as usual."""
    import pysqlite3.dbapi2 as sqlite3

    from localai.daemon import Watcher
    from localai.index import store, watcher

    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(watcher, "RETRY", (0.5,))
    index.add_source(docs)
    blocker = sqlite3.connect(str(index.path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    said = []
    w = Watcher(index, said.append)
    w.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("locked" in m for m in said):
            time.sleep(0.1)
        assert any("database is locked" in m and "trying again in 0.5 s" in m for m in said)
        blocker.execute("ROLLBACK")
        while time.monotonic() < deadline and not any("up to date" in m for m in said):
            time.sleep(0.1)
        assert any("index up to date: 5 files" in m for m in said), said
        assert index.search("sourdough starter", k=1)[0].path.endswith("kitchen.md")
    finally:
        w.stop()
        blocker.close()


def test_cli_index_search_sources_check(home, docs, tmp_path):
    env = dict(os.environ)
    r = localai("index", str(docs), "--json", env=env)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    for key in ("files", "chunks", "skipped", "text_bytes", "index_bytes", "seconds"):
        assert key in st, key
    assert st["files"] == 5 and {"path", "reason"} <= set(st["skipped"][0])
    r = localai("search", "sourdough starter", "-k", "2", "--json", env=env)
    hits = json.loads(r.stdout)
    assert len(hits) == 2 and hits[0]["path"].endswith("kitchen.md") and hits[0]["verified"]
    r = localai("search", "tomato", "-k", "2", env=env)
    assert r.returncode == 0 and "garden.html" in r.stdout
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"_id": "q7", "text": "bicycle chain"}\ntax deadline\n')
    r = localai("search", "--queries", str(queries), "-k", "3", "--unit", "file", env=env)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["_id"] for x in rows] == ["q7", "2"]
    assert rows[0]["results"][0]["path"].endswith("long.md")
    r = localai("sources", "list", "--json", env=env)
    assert json.loads(r.stdout)[0]["path"] == str(docs)
    r = localai("index", "--check", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = localai("search", "tomato", "--under", "~no-such-user-here/notes", env=env)
    assert r.returncode == 1 and "under:" in r.stderr and "Traceback" not in r.stderr
    r = localai("sources", "rm", str(docs), env=env)
    assert r.returncode == 0 and "7 files" in r.stderr  # 5 indexed + 2 skipped
    for extra in ("-wal", "-shm"):
        (home / f"index.db{extra}").unlink(missing_ok=True)
    (home / "index.db").write_bytes(b"not a database at all" * 100)  # damaged index file
    r = localai("search", "anything", env=env)
    assert r.returncode == 1 and "cannot be used" in r.stderr and "Traceback" not in r.stderr
    for args in (["index", str(tmp_path / "missing")], ["search"], ["sources", "rm", "/x"]):
        r = localai(*args, env=env)
        assert r.returncode == 1 and "Error:" in r.stderr and "Traceback" not in r.stderr, args


def test_cli_watch_indexes_saved_files_until_interrupted(home, docs):
    env = dict(os.environ)
    assert localai("index", str(docs), env=env).returncode == 0
    cmd = [sys.executable, "-m", "localai", "index", "--watch"]
    proc = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        for line in proc.stderr:
            if "watching" in line:
                break
        time.sleep(0.5)
        (docs / ".gitignore").write_text("drafts/\n")  # ignored and hidden paths stay out
        (docs / "drafts").mkdir()
        (docs / "drafts" / "veg.txt").write_text("zucchini draft")
        (docs / ".veg.md.swp").write_text("zucchini swap")
        (docs / "veg.md").write_text("Zucchini grows fast in warm summers.\n")
        ix = Index.open(load_settings())
        deadline, hits = time.monotonic() + 60, []
        while time.monotonic() < deadline and not hits:
            time.sleep(0.2)
            hits = ix.search("zucchini", k=5, mode="bm25")
        assert [os.path.basename(h.path) for h in hits] == ["veg.md"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130) and "Traceback" not in rest


def test_configured_codec_applies_to_a_new_index(home, docs, embedder):
    from localai.config import INDEX_CODECS
    from localai.index.vectors import CODECS

    assert set(INDEX_CODECS) == set(CODECS)
    ix = Index.open(load_settings(index_codec="int4"), embedder=embedder)
    ix.add_source(docs)
    ix.update()
    assert ix.stats()["codec"] == "int4" and ix.check() == []
    assert ix.search("sourdough starter", k=1)[0].path.endswith("kitchen.md")
    ix.close()
    ix = Index.open(load_settings(index_codec="bin1"), embedder=embedder)
    assert ix.stats()["codec"] == "int4"  # the recorded codec wins: codes are never mixed
    ix.close()


def test_vector_rescore_ranks_by_recomputed_embeddings(home, docs, embedder):
    """With 1-bit codes the order is approximate; re-scored, the top N is the exact cosine
    order of the chunks' own text, and a chunk whose file changed keeps its place after them."""
    ix = Index.open(load_settings(index_codec="bin1", vector_rescore=1000), embedder=embedder)
    ix.add_source(docs)
    ix.update()
    ids = [r[0] for r in ix.db.execute("SELECT id FROM chunks")]
    hits = ix.hits(ids)
    rows = {h.chunk_id: h for h in hits}
    texts = {h.chunk_id: p.text for h, p in zip(hits, ix.read_many(hits), strict=True)}
    exact = embedder.embed([texts[c] for c in ids])
    checked = 0
    for q in ("sourdough starter", "filing taxes", "a frog in a pond", "garden soil"):
        qv = embedder.embed([q])[0]
        want = [ids[i] for i in np.argsort(-(exact @ qv), kind="stable")]
        got = ix.vector_chunks(q, len(ids))
        assert got == want, q
        plain = ix.store.nearest(qv, len(ids))
        checked += plain != want  # bin1 alone gets some of these orders wrong
    assert checked, "every query was already exact without re-scoring: the test proves nothing"
    path = max(h.path for h in hits)  # one file changes after indexing
    Path(path).write_text("Rewritten after indexing: none of its chunks is there any more.\n")
    got = ix.vector_chunks("sourdough starter", len(ids))
    changed = {c for c in ids if rows[c].path == path}
    assert set(got[-len(changed) :]) == changed and sorted(got) == sorted(ids)
    ix.close()


def test_a_search_does_not_wait_for_another_ones_re_scoring(home, docs, embedder):
    """Re-scoring embeds the candidates outside the index lock: while one search is inside
    the embedder, another search of the same Index runs to the end."""

    class Held:
        def __init__(self):
            self.inside, self.go = threading.Event(), threading.Event()
            self.armed = False  # set once the index is built

        def embed(self, texts):
            if self.armed and len(texts) > 1 and not self.inside.is_set():  # first re-scoring
                self.inside.set()
                assert self.go.wait(60)
            return embedder.embed(texts)

        def __getattr__(self, name):
            return getattr(embedder, name)

    held = Held()
    ix = Index.open(load_settings(index_codec="bin1", vector_rescore=8), embedder=held)
    ix.add_source(docs)
    ix.update()
    held.armed = True
    first = threading.Thread(target=lambda: ix.search("sourdough starter", mode="vector"))
    first.start()
    try:
        assert held.inside.wait(60)
        other = []
        second = threading.Thread(target=lambda: other.append(ix.search("tax", mode="hybrid")))
        second.start()
        second.join(30)
        assert other and other[0][0].path.endswith("money.txt")
    finally:
        held.go.set()
        first.join(60)
    ix.close()


def test_an_index_from_before_short_hashes_keeps_its_vectors(home, docs, embedder):
    """Migration 3 cuts chunk hashes to 8 bytes and file sha256s to raw bytes: an index written
    with 16-byte chunk hashes and hex sha256s reads back verified and re-embeds nothing."""
    import hashlib

    from localai.index import store

    ix = Index.open(load_settings(), embedder=embedder)
    ix.add_source(docs)
    ix.update()
    ids = [r[0] for r in ix.db.execute("SELECT id FROM chunks")]
    hits = ix.hits(ids)
    texts = {h.chunk_id: p.text for h, p in zip(hits, ix.read_many(hits), strict=True)}
    with store.transaction(ix.db):  # what the index held before migration 3
        for cid, text in texts.items():
            old = hashlib.blake2b(text.encode(), digest_size=16).digest()
            ix.db.execute("UPDATE chunks SET hash = ? WHERE id = ?", [old, cid])
        ix.db.execute("UPDATE files SET sha256 = hex(sha256) WHERE sha256 IS NOT NULL")
        ix.db.execute("DELETE FROM migrations WHERE version = 3")
    ix.close()
    for f in docs.iterdir():
        os.utime(f, ns=(1, 1))  # touched: each file is hashed and compared with its record
    ix = Index.open(load_settings(), embedder=embedder)
    assert ix.db.execute("SELECT DISTINCT length(hash) FROM chunks").fetchall() == [(8,)]
    assert ix.db.execute("SELECT DISTINCT typeof(sha256), length(sha256) FROM files "
                         "WHERE sha256 IS NOT NULL").fetchall() == [("blob", 32)]  # fmt: skip
    st = ix.update()
    assert (st.embedded, st.changed, st.unchanged) == (0, 0, st.files + 2)
    hits = ix.search("how do I feed a sourdough starter", k=3)
    assert all(p.verified for p in ix.read_many(hits)) and ix.check() == []
    ix.close()


def test_an_index_refuses_vectors_of_another_embedding_model(home, docs, embedder):
    ix = Index.open(load_settings(), embedder=embedder)
    ix.add_source(docs)
    ix.update()
    ix.close()
    ix = Index.open(load_settings(embed_model="other-embedder"), embedder=embedder)
    with pytest.raises(IndexError_, match="holds minilm-l6-int8 vectors, but embed_model is other"):
        ix.update()
    with pytest.raises(IndexError_, match="cannot be compared"):
        ix.search("sourdough starter", mode="vector")
    assert ix.search("sourdough starter", k=1, mode="bm25")[0].path.endswith("kitchen.md")
    ix.close()
