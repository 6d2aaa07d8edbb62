"""Query latency of the whole search path at a synthetic 100k+ chunks.

Embedding 100k chunks takes hours on 2 cores, so the big index is synthesised directly into the
real store: chunk texts are NFCorpus sentences reshuffled into ~200-word chunks (fed to FTS5 the
way the indexer feeds it), vectors are the saved NFCorpus chunk vectors tiled with small noise
and encoded with the index's codec. Queries are the 323 NFCorpus test queries, run through
Index.search (query embedding, BM25, vector scan, fusion, row lookup) one at a time.
Prints one JSON object with p50/p99 per mode.

    python bench/index_scale.py [--chunks 100000] [--work /tmp/localai-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_nfcorpus import EVALS  # noqa: E402
from index_vectors import scale_up  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.index import store  # noqa: E402
from localai.index.chunker import HASH_BYTES  # noqa: E402
from localai.index.facade import db_path  # noqa: E402
from localai.index.fusion import fts_text  # noqa: E402
from localai.index.vectors import DEFAULT_CODEC, codec  # noqa: E402
from localai.runtime import open_index  # noqa: E402


def build(home: Path, n: int, vecs: np.ndarray) -> None:
    rng = random.Random(0)
    sentences = []
    for line in (EVALS / "corpus.jsonl").read_text().splitlines():
        sentences += json.loads(line)["text"].split(". ")
    db = store.connect(db_path(load_settings(home)))
    store.set_meta(db, "codec", DEFAULT_CODEC)
    codes = codec(DEFAULT_CODEC).encode(scale_up(vecs, n))
    per_file = 10
    db.execute("BEGIN")
    for f in range(0, n, per_file):
        fid = db.execute(
            "INSERT INTO files (path, size, mtime_ns, sha256, text_bytes, indexed_at) "
            "VALUES (?, 0, 0, '', 0, 0)", [f"/synthetic/{f // per_file}.txt"]
        ).lastrowid  # fmt: skip
        rows, texts = [], []
        for i in range(f, min(f + per_file, n)):
            text = ". ".join(rng.choice(sentences) for _ in range(8))
            rows.append((i - f, 0, 1, 1, 1, i.to_bytes(HASH_BYTES, "little"), codes[i].tobytes()))
            texts.append(fts_text(text))
        store.insert_chunks(db, fid, rows, texts)
    store.bump_generation(db)
    db.execute("COMMIT")
    store.optimize_fts(db)
    db.conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench"))
    args = ap.parse_args()
    vecs = np.load(args.work / "nfcorpus" / "chunk_vectors.npy")
    home = args.work / f"scale{args.chunks}"
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    if not (home / "index.db").exists():
        shutil.rmtree(home, ignore_errors=True)
        t = time.perf_counter()
        build(home, args.chunks, vecs)
        print(f"built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    ix = open_index(load_settings(home, models_dir=models))
    queries = [json.loads(x)["text"] for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    ix.search("warm up", k=10)  # loads the model and the vectors once
    out = {}
    for mode in ("hybrid", "bm25", "vector"):
        ts = []
        for q in queries:
            t = time.perf_counter()
            ix.search(q, k=10, mode=mode)
            ts.append(time.perf_counter() - t)
        ts.sort()
        out[mode] = {"p50_ms": round(1000 * ts[len(ts) // 2], 1),
                     "p99_ms": round(1000 * ts[int(len(ts) * 0.99)], 1)}  # fmt: skip
    st = ix.stats()
    machine = f"{platform.machine()} {os.cpu_count()} cpus"
    print(json.dumps({"bench": "index_scale", "machine": machine,
                      "date": time.strftime("%Y-%m-%d"), "chunks": st["chunks"],
                      "codec": st["codec"], "index_bytes": st["index_bytes"],
                      "vectors_ram_mb": round(ix.store.vector_set().nbytes / 1e6, 1),
                      "queries": len(queries), "modes": out}))  # fmt: skip


if __name__ == "__main__":
    main()
