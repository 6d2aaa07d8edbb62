"""The index's BM25 store: the small "tf" FTS layout (detail=none + repeated-term side table,
ranked by bm25.Scorer) for new indexes, and the older detail=full layout kept working and
upgradable. Real sqlite files, real documents, the real MiniLM tokenizer."""

import json
import os
import random

import pysqlite3.dbapi2 as sqlite3
import pytest
import sqlite_utils
from conftest import localai
from test_index import TOPICS, write_docs

from localai.config import load_settings
from localai.index import store
from localai.index.bm25 import TOKENIZER, Scorer, docsize_lengths
from localai.index.facade import Index
from localai.index.fusion import fts_query, fts_text, query_words

OLD_FTS = (  # the FTS table every index had before migration 2, as it was created then
    "CREATE VIRTUAL TABLE fts USING fts5(text, content='', contentless_delete=1, "
    "tokenize='porter unicode61 remove_diacritics 2')"
)


def fts_sql(db) -> str:
    return db.execute("SELECT sql FROM sqlite_master WHERE name = 'fts'").fetchone()[0]


def add_file(db, fid: int, texts: list[str]) -> None:
    db.execute("INSERT INTO files (id, path, size, mtime_ns, indexed_at) VALUES (?, ?, 1, 1, 0)",
               [fid, f"/f{fid}"])  # fmt: skip
    rows = [(i, 0, 1, 1, 1, bytes([fid, i]) * 8, b"c" * 384) for i in range(len(texts))]
    store.insert_chunks(db, fid, rows, [fts_text(t) for t in texts])


def test_new_and_old_databases_migrate_to_their_layouts(tmp_path):
    db = store.connect(tmp_path / "new.db")
    assert store.fts_layout(db) == "tf" and "detail=none" in fts_sql(db)
    assert "fts_tf" in db.table_names() and store.problems(db, 384) == []
    # an index from before migration 2, with chunks: its detail=full table stays as it is
    conn = sqlite3.connect(str(tmp_path / "old.db"), isolation_level=None)
    old = sqlite_utils.Database(conn)
    store.migrate(old)  # today's schema, then made old: what migration 1 alone left behind
    old.execute("DROP TABLE fts")
    old.execute("DROP TABLE fts_tf")
    old.execute(OLD_FTS)
    old.execute("DELETE FROM meta")
    old.execute("DELETE FROM migrations WHERE version > 1")
    with store.transaction(old):
        add_file(old, 1, ["Knead the dough with flour and yeast."])
    conn.close()
    db = store.connect(tmp_path / "old.db")
    assert store.schema_version(db) == len(store.MIGRATIONS) and store.fts_layout(db) == "full"
    assert "detail" not in fts_sql(db) and "fts_tf" not in db.table_names()
    assert db.execute("SELECT rowid FROM fts WHERE fts MATCH 'yeast'").fetchall()
    assert store.problems(db, 384) == []


def test_freed_pages_go_back_to_the_file_system(tmp_path):
    """After an upgrade drops the old FTS table (and after each indexing run) the freed pages
    are returned, so index_bytes shrinks; the pragma frees one page per fetched row."""
    db = store.connect(tmp_path / "index.db")
    with store.transaction(db):
        for f in range(1, 41):
            add_file(db, f, [f"chunk {f} {i} " + "word " * 50 for i in range(5)])
    with store.transaction(db):
        for f in range(1, 41):
            store.delete_file(db, f)
    assert db.execute("PRAGMA freelist_count").fetchone()[0] > 20
    store.reclaim_free_pages(db)
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_docsize_lengths_decode_fts5_varints():
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, content='', tokenize='{TOKENIZER}')")
    counts = [0, 1, 127, 128, 300, 16383, 16384, 70000]
    db.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)",
                   [(i, "word " * n) for i, n in enumerate(counts)])  # fmt: skip
    blobs = [r[0] for r in db.execute("SELECT sz FROM t_docsize ORDER BY id")]
    assert max(map(len, blobs)) == 3  # 1-, 2- and 3-byte varints all occur
    assert docsize_lengths(blobs).tolist() == counts


FORMS = [("connect", "connected", "connecting", "connection"), ("run", "running", "runs"),
         ("index", "indexes", "indexed")]  # fmt: skip
PLAIN = ["zebra", "quartz", "violin", "harbor", "glacier", "pepper", "saddle", "lantern", "meadow",
         "copper", "orbit", "walnut", "falcon", "tundra", "ember", "cobalt"]  # fmt: skip


def test_own_scorer_orders_like_fts5_bm25_when_tf_is_exact(tmp_path):
    """Chunks whose terms occur 1 to 7 times (spelled in different forms that stem alike):
    the side table knows every tf exactly, so the own scorer must rank every match exactly as
    FTS5's bm25() does on a detail=full table of the same rows (its idf, length norm, avgdl)."""
    rng = random.Random(7)
    terms = [list(f) for f in FORMS] + [[w] for w in PLAIN]
    texts = []
    for d in range(120):
        words = [f"filler{d}x{j}" for j in range(rng.randint(0, 40))]  # varied lengths
        for forms in rng.sample(terms, rng.randint(2, 8)):
            words += [rng.choice(forms) for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 7]))]
        rng.shuffle(words)
        texts.append("The " + " ".join(words) + ".")
    db = store.connect(tmp_path / "index.db")
    with store.transaction(db):
        for f in range(12):
            add_file(db, f + 1, texts[f * 10 : f * 10 + 10])
    ids = [r[0] for r in db.execute("SELECT id FROM chunks ORDER BY id")]
    ref = sqlite3.connect(":memory:", isolation_level=None)
    ref.execute(f"CREATE VIRTUAL TABLE fts USING fts5(text, tokenize='{TOKENIZER}')")
    ref.executemany("INSERT INTO fts (rowid, text) VALUES (?, ?)",
                    [(i, fts_text(t)) for i, t in zip(ids, texts, strict=True)])  # fmt: skip
    scorer = Scorer(db)
    queries = ["connections", "the running zebra", "indexing copper and walnut lanterns",
               "glacier glacier orbit", "falcon tundra ember cobalt connects"]  # fmt: skip
    queries += [" ".join(rng.sample(PLAIN, 3)) for _ in range(15)]
    for q in queries:
        sql = "SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY rank, rowid"
        want = [r[0] for r in ref.execute(sql, [fts_query(q)])]
        assert len(want) > 5, q
        assert scorer.search(db, query_words(q), 1000) == want, q
        assert scorer.search(db, query_words(q), 5) == want[:5], q


@pytest.fixture
def index(home, embedder):
    ix = Index.open(load_settings(), embedder=embedder)
    yield ix
    ix.close()


def side_rows(ix) -> set[int]:
    return {r[0] for r in ix.db.execute("SELECT id FROM fts_tf_docsize")}


def chunk_ids(ix, name: str) -> set[int]:
    sql = "SELECT c.id FROM chunks c JOIN files f ON f.id = c.file_id WHERE f.path LIKE ?"
    return {r[0] for r in ix.db.execute(sql, ["%/" + name])}


def test_bm25_search_and_side_table_through_reindex(index, tmp_path):
    docs = tmp_path / "docs"
    write_docs(docs)
    (docs / "code.py").write_text("def parse_config(path):\n    return load_yaml_file(path)\n")
    (docs / "haiku.txt").write_text("An old silent pond; a frog jumps in, splash!\n")
    index.add_source(docs)
    index.update()
    assert index.stats()["fts_layout"] == "tf" and index.check() == []
    hits = index.search("sourdough starter", k=1, mode="bm25")
    assert hits[0].path.endswith("kitchen.md")
    assert index.search("parse_config", k=1, mode="bm25")[0].path.endswith("code.py")
    odd = ["foo_bar_baz", "C++ -> (x) [y]: {z}?!", "don't \"quote\" it", "über-naïve café",
           "a_b_c__d", "NEAR(x y)", "x* OR y AND NOT z", "12.5% ±3"]  # fmt: skip
    for q in odd:  # FTS5 syntax and multi-token words must not reach a MATCH as such
        index.search(q, k=3, mode="bm25")
        index.search(q, k=3)
    # a chunk has a side row exactly when its text repeats a term
    assert not side_rows(index) & chunk_ids(index, "haiku.txt")
    long_md = chunk_ids(index, "long.md")
    assert long_md and long_md <= side_rows(index)  # its sections repeat their sentence
    (docs / "money.txt").write_text("Receipts receipts receipts receipts for the tax office.\n")
    (docs / "long.md").unlink()
    index.update()
    assert index.check() == []
    assert not side_rows(index) & long_md
    found = index.db.execute("SELECT rowid FROM fts_tf WHERE fts_tf MATCH '\"receipt=4\"'")
    assert {r[0] for r in found} == chunk_ids(index, "money.txt")
    assert index.search("receipts", k=1, mode="bm25")[0].path.endswith("money.txt")
    index.db.execute("INSERT INTO fts_tf (rowid, text) VALUES (999999, 'orphan')")
    assert index.check() == ["1 FTS repeated-term rows without a chunk"]


def make_old(home) -> None:
    """Turn the index at home into one from before migration 2: the old detail=full table
    (empty), no layout recorded, migration 2 not applied."""
    db = store.connect(home / "index.db")
    with store.transaction(db):
        db.execute("DROP TABLE fts")
        db.execute("DROP TABLE fts_tf")
        db.execute(OLD_FTS)
        db.execute("DELETE FROM meta WHERE key = 'fts_layout'")
        db.execute("DELETE FROM migrations WHERE version = 2")
    db.conn.close()


def test_old_layout_keeps_searching_and_upgrades(home, embedder, tmp_path):
    docs = tmp_path / "docs"
    write_docs(docs)
    ix = Index.open(load_settings(), embedder=embedder)
    ix.add_source(docs)
    ix.update()
    new_top = [h.chunk_id for h in ix.search("yeast dough", k=3, mode="bm25")]
    ix.close()
    make_old(home)
    ix = Index.open(load_settings(), embedder=embedder)
    assert ix.stats()["fts_layout"] == "full"
    assert ix.refeed_fts() == ix.stats()["chunks"]  # fed the old way, ranked by bm25()
    assert ix.check() == []
    old_top = [h.chunk_id for h in ix.search("yeast dough", k=3, mode="bm25")]
    assert ix.db.execute("SELECT count(*) FROM fts_docsize").fetchone()[0] == ix.stats()["chunks"]
    assert old_top[0] == new_top[0]
    assert ix.search("tomato", k=1)[0].path.endswith("garden.html")
    env = dict(os.environ)
    r = localai("index", "--check", env=env)
    assert r.returncode == 0 and "older, larger FTS layout" in r.stderr
    assert "localai index --upgrade" in r.stderr
    (docs / "money.txt").write_text(TOPICS["taxes"] + "\n\nKeep invoices for ten years.\n")
    r = localai("index", "--upgrade", "--json", env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["stale_files"] == 1 and got["chunks"] == ix.stats()["chunks"]  # money.txt dropped
    # the open index sees the new layout (the upgrade bumped the generation)
    assert ix.stats()["fts_layout"] == "tf" and ix.check() == []
    assert [h.chunk_id for h in ix.search("yeast dough", k=3, mode="bm25")][0] == new_top[0]
    assert not any(h.path.endswith("money.txt") for h in ix.search("income tax", mode="bm25"))
    st = ix.update()
    assert st.changed == 1 and ix.check() == []
    assert ix.search("invoices", k=1, mode="bm25")[0].path.endswith("money.txt")
    r = localai("index", "--check", env=env)
    assert r.returncode == 0 and "older" not in r.stderr
    r = localai("index", "--upgrade", env=env)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert ix.upgrade_fts() == {"chunks": 0, "stale_files": 0}  # a current index: nothing to do
    ix.close()


def test_a_bulk_run_merges_the_fts_segments(home, embedder, tmp_path, monkeypatch):
    """One transaction per file leaves one FTS5 segment per file; a run that writes many chunks
    merges them at the end (fewer data records, smaller file), and the index stays whole."""
    from localai.index import indexer

    docs = tmp_path / "docs"
    write_docs(docs)
    records = {}
    for after in (10**9, 1):  # never, then after every run
        monkeypatch.setattr(indexer, "OPTIMIZE_AFTER", after)
        ix = Index.open(load_settings(home=home / str(after)), embedder=embedder)
        ix.add_source(docs)
        ix.update()
        assert ix.check() == []
        assert ix.search("sourdough starter", k=1, mode="bm25")[0].path.endswith("kitchen.md")
        records[after] = [
            ix.db.execute(f"SELECT count(*) FROM {t}_data").fetchone()[0] for t in ("fts", "fts_tf")
        ]
        ix.close()
    assert all(a < b for a, b in zip(records[1], records[10**9], strict=True)), records
