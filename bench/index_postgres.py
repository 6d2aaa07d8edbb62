"""The document index on PostgreSQL against the sqlite index, on NFCorpus, in one run.

Both stores index the same files (bench/index_nfcorpus.py writes them and scores the runs) with
the same embedder. The first, sqlite ingest embeds every chunk and keeps the vectors (also in
--work, for the next run: then it embeds nothing, and its rate is not reported); every later
ingest (sqlite again, PostgreSQL, the concurrent writers) takes its vectors from that memo, so
their chunks/s measure the store's write path, not MiniLM. Then:
- quality and latency: nDCG@10, Recall@100, query p50/p99 in each mode (unit "file");
- size: the index's bytes per byte of extracted text (PostgreSQL: its tables, their indexes and
  TOAST; sqlite: the file and its WAL);
- export: `Index.export` of the sqlite index into an empty database (no embedding);
- concurrency: 4 writer processes, each indexing two of four overlapping quarters of the corpus
  (every file written by two of them), while 8 searcher processes run the queries in a loop;
  afterwards the database must hold exactly the sqlite index's (path, ord, hash) chunks.
The server is the embedded one (`localai db start` runs the same code), under --work.
Prints one JSON object.

    python bench/index_postgres.py [--work /tmp/localai-bench/pg] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_nfcorpus import EVALS, evaluate, load_qrels, write_corpus  # noqa: E402

from localai.catalog import Catalog  # noqa: E402
from localai.config import load_settings  # noqa: E402
from localai.index import pg_server  # noqa: E402
from localai.index.embedder import Embedder  # noqa: E402
from localai.index.facade import Index  # noqa: E402

MODES = ("bm25", "vector", "hybrid")
WRITERS, SEARCHERS = 4, 8


class Memo:
    """The real embedder, remembering every text's vector: later ingests reuse them (and a
    later run of this script, through `save`/`load`)."""

    def __init__(self, emb: Embedder, path: Path):
        self.emb, self.seen, self.path, self.saved = emb, {}, path, 0

    def load(self) -> None:
        if self.path.exists():
            got = np.load(self.path, allow_pickle=False)
            self.seen.update(zip(got["texts"].tolist(), got["vecs"], strict=True))
        self.saved = len(self.seen)

    def save(self) -> None:
        """Every few hundred new vectors, so an interrupted run's embedding is not lost."""
        texts = list(self.seen)
        np.savez(self.path, texts=np.array(texts), vecs=np.stack([self.seen[t] for t in texts]))
        self.saved = len(texts)

    def __getattr__(self, name):
        return getattr(self.emb, name)

    def embed(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if todo:
            self.seen.update(zip(todo, self.emb.embed(todo), strict=True))
            if len(self.seen) - self.saved >= 256:
                self.save()
        return np.stack([self.seen[t] for t in texts]) if texts else np.zeros((0, 384))


def fresh_db(base_uri: str, name: str) -> str:
    import psycopg

    with psycopg.connect(base_uri, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return base_uri.replace("/localai?", f"/{name}?")


def ingest(settings, memo, docs: Path) -> tuple[Index, dict]:
    ix = Index.open(settings, embedder=memo)
    ix.add_source(docs)
    st = ix.update()
    rate = round(st.chunks / st.seconds, 1) if st.seconds else None
    return ix, {"seconds": st.seconds, "chunks": st.chunks, "chunks_per_s": rate,
                "embedded": st.embedded}  # fmt: skip


def store_run(ix: Index, ingest_info: dict, queries, qrels, ids) -> dict:
    s = ix.stats()
    return {
        "ingest": ingest_info,
        "index_bytes": s["index_bytes"],
        "text_bytes": s["text_bytes"],
        "bytes_per_text_byte": round(s["index_bytes"] / s["text_bytes"], 3),
        "modes": {m: evaluate(ix, queries, qrels, ids, m) for m in MODES},
    }


def chunk_keys(ix: Index) -> list[tuple]:
    if ix.store.kind == "sqlite":
        sql = "SELECT f.path, c.ord, c.hash FROM chunks c JOIN files f ON f.id = c.file_id"
        return sorted(ix.db.execute(sql).fetchall())
    rows = ix.store.conn.execute("SELECT f.path, c.ord, c.hash FROM chunks c JOIN files f "
                                 "ON f.id = c.file_id").fetchall()  # fmt: skip
    return sorted(rows)


def _writer(settings, memo, paths: list[str], out) -> None:
    ix = Index.open(settings, embedder=memo)
    st = ix.update(paths)
    out.put(("writer", st.changed, st.seconds))
    ix.close()


def _searcher(settings, memo, texts: list[str], stop, out) -> None:
    ix = Index.open(settings, embedder=memo)
    times, i = [], 0
    while not stop.is_set() or i < len(texts) // SEARCHERS:
        t = time.perf_counter()
        ix.search(texts[i % len(texts)], k=10, unit="file", mode="hybrid")
        times.append(time.perf_counter() - t)
        i += 1
    out.put(("searcher", times))
    ix.close()


def concurrent(settings, memo, files: list[str], texts: list[str]) -> dict:
    """4 writers on overlapping quarters, 8 searchers, one database (fork: each child gets the
    memo)."""
    ctx = mp.get_context("fork")
    q = [files[i::4] for i in range(4)]
    out, stop = ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(settings, memo, q[i] + q[(i + 1) % 4], out))
               for i in range(WRITERS)]  # fmt: skip
    turns = [texts[i:] + texts[:i] for i in range(SEARCHERS)]  # each starts elsewhere
    searchers = [ctx.Process(target=_searcher, args=(settings, memo, t, stop, out))
                 for t in turns]  # fmt: skip
    t0 = time.perf_counter()
    for p in searchers + writers:
        p.start()
    got = [out.get() for _ in writers]
    wall = time.perf_counter() - t0
    stop.set()
    got += [out.get() for _ in searchers]
    for p in searchers + writers:
        p.join()
    lat = sorted(t for kind, *rest in got if kind == "searcher" for t in rest[0])
    return {
        "writers": WRITERS,
        "searchers": SEARCHERS,
        "writes_wall_s": round(wall, 1),
        "files_written": sum(r[1] for r in got if r[0] == "writer"),
        "searches": len(lat),
        "search_p50_ms": round(1000 * lat[len(lat) // 2], 1),
        "search_p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench/pg"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument(
        "--scale", type=int, default=100_000, help="chunks for the latency run; 0: none"
    )
    ap.add_argument("--reuse-scale", action="store_true", help="the last run's sqlite index")
    args = ap.parse_args()
    docs = args.work / (f"docs-{args.limit}" if args.limit else "docs")  # only those files
    ids = write_corpus(docs, args.limit)
    qrels = load_qrels()
    queries = [json.loads(x) for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    if args.limit:
        queries = [q for q in queries if any(d in set(ids.values()) for d in qrels[q["_id"]])]
    models = Path(os.environ.get("LOCALAI_MODELS", Path.home() / ".cache/localai-test/models"))
    base = load_settings(args.work / "home", models_dir=models)
    cat = Catalog(base.models_dir)
    cat.ensure(base.embed_model)
    memo = Memo(Embedder(cat.file(base.embed_model, "model.onnx"),
                         cat.file(base.embed_model, "tokenizer.json"), base.threads),
                args.work / "vectors.npz")  # fmt: skip
    server = pg_server.start(args.work / "pghome")

    out = {"bench": "index_postgres", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "docs": len(ids),
           "queries": len(queries)}  # fmt: skip
    for home in ("sqlite-embed", "sqlite"):  # the first embeds (fills the memo), the second not
        shutil.rmtree(args.work / home, ignore_errors=True)
    memo.load()
    cached = bool(memo.seen)
    ix, first = ingest(load_settings(args.work / "sqlite-embed", models_dir=models), memo, docs)
    ix.close()
    memo.save()
    sq, info = ingest(load_settings(args.work / "sqlite", models_dir=models), memo, docs)
    out["embedding_bound_ingest"] = "vectors from a previous run" if cached else first
    memo.seen.update(zip([q["text"] for q in queries],
                         memo.emb.embed([q["text"] for q in queries]), strict=True))  # fmt: skip
    out["sqlite"] = store_run(sq, info, queries, qrels, ids)
    pg_settings = load_settings(args.work / "home", models_dir=models,
                                index_store=fresh_db(server, "bench_main"))  # fmt: skip
    pg, info = ingest(pg_settings, memo, docs)
    out["postgresql"] = store_run(pg, info, queries, qrels, ids)
    want = chunk_keys(sq)
    out["same_chunks"] = chunk_keys(pg) == want
    nd = {k: {m: out[k]["modes"][m]["ndcg@10"] for m in MODES} for k in ("sqlite", "postgresql")}
    out["ndcg10_delta"] = {m: round(nd["postgresql"][m] - nd["sqlite"][m], 4) for m in MODES}
    pg.close()

    uri = fresh_db(server, "bench_export")
    t = time.perf_counter()
    got = sq.export(uri)
    out["export"] = {**got, "seconds": round(time.perf_counter() - t, 2)}
    ex = Index.open(load_settings(args.work / "home", models_dir=models, index_store=uri),
                    embedder=memo)  # fmt: skip
    out["export"]["same_chunks"] = chunk_keys(ex) == want
    out["export"]["hybrid"] = evaluate(ex, queries, qrels, ids, "hybrid")
    ex.close()

    conc = load_settings(args.work / "home", models_dir=models,
                         index_store=fresh_db(server, "bench_conc"))  # fmt: skip
    files = sorted(str(p) for p in docs.iterdir())
    out["concurrent"] = concurrent(conc, memo, files, [q["text"] for q in queries])
    cx = Index.open(conc)
    keys = chunk_keys(cx)
    out["concurrent"]["duplicate_chunks"] = len(keys) - len({(p, o) for p, o, _ in keys})
    out["concurrent"]["lost_chunks"] = len(set(want) - set(keys))
    out["concurrent"]["same_chunks"] = keys == want
    cx.close()
    sq.close()
    if args.scale:
        out["scale"] = at_scale(args, memo, server, docs, queries, qrels, ids, models)
    print(json.dumps(out))


def scaled_docs(docs: Path, copies: int) -> Path:
    """`copies` hard-linked copies of the corpus folder (no extra disk): copy i is c{i}/."""
    root = docs.parent / f"{docs.name}-x{copies}"
    for i in range(copies):
        d = root / f"c{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for p in docs.iterdir():
            if not (d / p.name).exists():
                os.link(p, d / p.name)
    return root


def latency(ix: Index, queries, qrels, ids) -> dict:
    """Query p50/p99 per mode (the copies repeat the corpus, so its quality is not scored)."""
    got = {m: evaluate(ix, queries, qrels, ids, m) for m in MODES}
    return {m: {k: r[k] for k in ("p50_ms", "p99_ms")} for m, r in got.items()}


def at_scale(args, memo, server, docs, queries, qrels, ids, models) -> dict:
    """The corpus copied until it holds --scale chunks: sqlite ingest (vectors from the memo;
    --reuse-scale: the last run's index), then export into PostgreSQL; query latency on both,
    and on PostgreSQL with its HNSW index over the bits (pg_schema, version 2) and without it
    (the exact Hamming scan)."""
    per_copy = Index.open(load_settings(args.work / "sqlite", models_dir=models)).stats()["chunks"]
    copies = -(-args.scale // per_copy)
    root = scaled_docs(docs, copies)
    home = args.work / "sqlite-scale"
    if args.reuse_scale and (home / "index.db").exists():
        sq = Index.open(load_settings(home, models_dir=models), embedder=memo)
        info = {"chunks": sq.stats()["chunks"], "reused": True}
    else:
        shutil.rmtree(home, ignore_errors=True)
        sq, info = ingest(load_settings(home, models_dir=models), memo, root)
    out = {"copies": copies, "chunks": info["chunks"], "sqlite_ingest": info,
           "sqlite": latency(sq, queries, qrels, ids)}  # fmt: skip
    uri = fresh_db(server, "bench_scale")
    t = time.perf_counter()
    out["export"] = {**sq.export(uri), "seconds": round(time.perf_counter() - t, 1)}
    sq.close()
    pg = Index.open(load_settings(args.work / "home", models_dir=models, index_store=uri),
                    embedder=memo)  # fmt: skip
    out["postgresql"] = latency(pg, queries, qrels, ids)
    pg.store.conn.execute("DROP INDEX chunks_bits")
    out["postgresql_exact_scan"] = latency(pg, queries, qrels, ids)
    t = time.perf_counter()
    pg.store.conn.execute("CREATE INDEX chunks_bits ON chunks USING hnsw (bits bit_hamming_ops)")
    out["hnsw_build_s"] = round(time.perf_counter() - t, 1)
    pg.close()
    return out


if __name__ == "__main__":
    main()
