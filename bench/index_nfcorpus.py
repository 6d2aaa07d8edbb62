"""Retrieval quality and speed of the document index on BEIR NFCorpus (../shared/evals).

Evaluation only: each document (title + " " + text, as the baselines index it) is written as one
file into a scratch folder, indexed through the public Index API exactly as `localai index` would,
and the 323 test queries are run with `unit="file"` in three modes (bm25, vector, hybrid).
Metrics follow trec_eval (nDCG@10 with linear gain, Recall@100). The float32 vectors the embedder
produced are kept (in the scratch folder) so that bench/index_vectors.py can compare codecs on
exactly these vectors. Prints one JSON object.

    python bench/index_nfcorpus.py [--work /tmp/localai-bench/nfcorpus] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localai.catalog import Catalog  # noqa: E402
from localai.config import load_settings  # noqa: E402
from localai.index.embedder import Embedder  # noqa: E402
from localai.index.facade import Index  # noqa: E402

EVALS = ROOT.parent / "shared" / "evals" / "nfcorpus"
BASELINES = {
    "bm25": {"ndcg@10": 0.3187, "recall@100": 0.2469},
    "vector": {"ndcg@10": 0.3149, "recall@100": 0.3108},
    "hybrid": {"ndcg@10": 0.3507, "recall@100": 0.3221},
}


class RecordingEmbedder(Embedder):
    """The real embedder, keeping every chunk vector it computes (for the codec comparison)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: dict[str, np.ndarray] = {}

    def embed(self, texts):
        out = super().embed(texts)
        if len(texts) > 1 or texts and len(texts[0]) > 200:  # chunk batches, not queries
            self.seen.update(zip(texts, out, strict=True))
        return out


def write_corpus(folder: Path, limit: int | None) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = {}
    with open(EVALS / "corpus.jsonl") as f:
        for n, line in enumerate(f):
            if limit and n >= limit:
                break
            d = json.loads(line)
            name = d["_id"] + ".txt"
            p = folder / name
            text = d["title"] + " " + d["text"]
            if not p.exists() or p.read_text() != text:
                p.write_text(text)
            ids[name] = d["_id"]
    return ids


def load_qrels() -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(EVALS / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            q, d, g = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(g)
    return qrels


def ndcg10(ranked: list[str], rel: dict[str, int]) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(rel.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall100(ranked: list[str], rel: dict[str, int]) -> float:
    return len(set(ranked[:100]) & set(rel)) / len(rel) if rel else 0.0


def evaluate(ix: Index, queries: list[dict], qrels, ids: dict[str, str], mode: str) -> dict:
    nd, rc, times = [], [], []
    for q in queries:
        t = time.perf_counter()
        hits = ix.search(q["text"], k=100, unit="file", mode=mode)
        times.append(time.perf_counter() - t)
        ranked = [ids[Path(h.path).name] for h in hits]
        nd.append(ndcg10(ranked, qrels[q["_id"]]))
        rc.append(recall100(ranked, qrels[q["_id"]]))
    times.sort()
    return {
        "ndcg@10": round(statistics.mean(nd), 4),
        "recall@100": round(statistics.mean(rc), 4),
        "p50_ms": round(1000 * times[len(times) // 2], 2),
        "p99_ms": round(1000 * times[int(len(times) * 0.99)], 2),
        "baseline": BASELINES[mode],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench/nfcorpus"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--refeed", action="store_true", help="rewrite FTS rows from the files first")
    args = ap.parse_args()
    ids = write_corpus(args.work / "docs", args.limit)
    models = Path(os.environ.get("LOCALAI_MODELS", Path.home() / ".cache/localai-test/models"))
    settings = load_settings(args.work / "home", models_dir=models)
    cat = Catalog(settings.models_dir)
    cat.ensure(settings.embed_model)
    name = settings.embed_model
    model, tok = cat.file(name, "model.onnx"), cat.file(name, "tokenizer.json")
    emb = RecordingEmbedder(model, tok, settings.threads)
    ix = Index.open(settings, embedder=emb)
    ix.add_source(args.work / "docs")
    st = ix.update()
    if args.refeed:
        ix.refeed_fts()
    if emb.seen:  # kept for bench/index_vectors.py
        texts = list(emb.seen)
        np.save(args.work / "chunk_vectors.npy", np.stack([emb.seen[t] for t in texts]))
    qrels = load_qrels()
    queries = [json.loads(x) for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    if args.limit:
        queries = [q for q in queries if any(d in set(ids.values()) for d in qrels[q["_id"]])]
    qv = emb.embed([q["text"] for q in queries])
    np.save(args.work / "query_vectors.npy", qv)
    result = {
        "bench": "index_nfcorpus",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "docs": len(ids),
        "queries": len(queries),
        "ingest": {
            "seconds": st.seconds,
            "chunks_embedded": st.embedded,
            "chunks_per_s": round(st.embedded / st.seconds, 1) if st.embedded else None,
            "text_mb_per_s": round(st.text_bytes / 1e6 / st.seconds, 3) if st.embedded else None,
        },
        "index": ix.stats(),
        "modes": {m: evaluate(ix, queries, qrels, ids, m) for m in ("bm25", "vector", "hybrid")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
