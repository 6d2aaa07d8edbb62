"""Vector re-scoring by recomputed embeddings on NFCorpus: recall@10 against exact cosine and
query latency, through the real Index path (codes scan → re-read the top N chunks from their
files → embed them → exact cosine), at several depths N.

The index is built with 48-byte `bin1` codes (6% of NFCorpus's text per chunk), the design that
meets the issue's vector-storage goal only with re-scoring. The exact reference re-embeds every
chunk's own text once. Each query is timed from its text to the ranked chunk ids, query
embedding included. Prints one JSON object.

    python bench/index_rescore.py [--work /tmp/localai-bench/rescore] [--queries 323]
                                  [--depths 0,24,48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_nfcorpus import EVALS, write_corpus  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.runtime import open_index  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench/rescore"))
    ap.add_argument("--queries", type=int, default=323)
    ap.add_argument("--depths", default="0,24,48")
    ap.add_argument("--codec", default="bin1")
    args = ap.parse_args()
    write_corpus(args.work / "docs", None)
    models = Path(os.environ.get("LOCALAI_MODELS", Path.home() / ".cache/localai-test/models"))
    settings = load_settings(args.work / "home", models_dir=models, index_codec=args.codec)
    ix = open_index(settings)
    ix.add_source(args.work / "docs")
    st = ix.update()
    ids = [r[0] for r in ix.db.execute("SELECT id FROM chunks ORDER BY id")]
    hits = ix.hits(ids)
    texts = [p.text for p in ix.read_many(hits)]
    t = time.perf_counter()
    exact = ix.embedder.embed(texts)  # (N, 384)
    embed_s = time.perf_counter() - t
    queries = [json.loads(x)["text"] for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    queries = queries[: args.queries]
    ix.vector_chunks(queries[0], 10)  # load the vector set and warm the embedder
    rows = {}
    for depth in [int(d) for d in args.depths.split(",")]:
        ix.settings.vector_rescore = depth
        recalls, times = [], []
        for q in queries:
            t = time.perf_counter()
            got = ix.vector_chunks(q, 100)[:10]
            times.append(time.perf_counter() - t)
            qv = ix.embedder.embed([q])[0]
            want = {ids[i] for i in np.argsort(-(exact @ qv))[:10]}
            recalls.append(len(want & set(got)) / 10)
        times.sort()
        rows[str(depth)] = {"recall@10": round(statistics.mean(recalls), 4),
                            "p50_ms": round(1000 * times[len(times) // 2], 1),
                            "p99_ms": round(1000 * times[int(len(times) * 0.99)], 1)}  # fmt: skip
    text_bytes = st.text_bytes or 1
    print(json.dumps({
        "bench": "index_rescore", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_1m": round(os.getloadavg()[0], 2),
        "codec": ix.codec.name, "chunks": len(ids), "queries": len(queries),
        "code_share_of_text": round(ix.codec.nbytes * len(ids) / text_bytes, 4),
        "index_bytes_share_of_text": round(st.index_bytes / text_bytes, 4),
        "exact_reembed_chunks_per_s": round(len(ids) / embed_s, 1), "by_depth": rows,
    }))  # fmt: skip
    ix.close()


if __name__ == "__main__":
    main()
