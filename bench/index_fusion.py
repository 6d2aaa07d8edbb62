"""Fusion strategies on NFCorpus: which way of combining BM25 and vectors ranks best.

Uses the index that bench/index_nfcorpus.py built (same work folder). For each query the BM25
chunk list (with bm25() scores) and the vector chunk list (with cosines) are computed once; each
strategy then ranks documents (a document scores as its best chunk) and is scored with nDCG@10
and Recall@100. Strategies: RRF with several k and weights, and a convex combination of
min-max-normalised scores. Prints one JSON object.

    python bench/index_fusion.py [--work /tmp/localai-bench/nfcorpus]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_nfcorpus import EVALS, load_qrels, ndcg10, recall100  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.index.facade import Index  # noqa: E402
from localai.index.fusion import fts_query, rrf  # noqa: E402
from localai.index.vectors import CODECS, VectorSet  # noqa: E402
from localai.runtime import open_index  # noqa: E402

DEPTH = 300


def saved_vectors(ix: Index, work: Path) -> VectorSet | None:
    """The float32 vectors index_nfcorpus.py saved, matched to chunk ids: they were embedded in
    chunk-id order, once per distinct content hash (repeats reused the first one's code)."""
    x = np.load(work / "chunk_vectors.npy")
    rows = ix.db.execute("SELECT id, hash FROM chunks ORDER BY id").fetchall()
    first: dict[bytes, int] = {}
    for _, h in rows:
        first.setdefault(h, len(first))
    if len(first) != len(x):
        return None
    ids = np.array([c for c, _ in rows], dtype=np.int64)
    mat = x[[first[h] for _, h in rows]]
    return VectorSet(CODECS["f32"], ids, CODECS["f32"].encode(mat))


def doc_lists(ix: Index, text: str, doc_of: dict[int, str], vs: VectorSet | None = None, qv=None):
    q = fts_query(text)
    bm = ix.db.execute("SELECT rowid, -bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY rank LIMIT ?",
                       [q, DEPTH]).fetchall() if q else []  # fmt: skip
    qv = ix.embedder.embed([text])[0] if qv is None else qv
    ids, scores = (vs or ix.store.vector_set()).search(qv, DEPTH)
    best_b: dict[str, float] = {}
    for c, s in bm:
        best_b.setdefault(doc_of[c], s)
    best_v: dict[str, float] = {}
    for c, s in zip(ids.tolist(), scores.tolist(), strict=True):
        best_v.setdefault(doc_of[c], s)
    return best_b, best_v


def convex(b: dict, v: dict, alpha: float) -> list[str]:
    def norm(d):
        if not d:
            return {}
        lo, hi = min(d.values()), max(d.values())
        return {k: (x - lo) / (hi - lo or 1) for k, x in d.items()}

    nb, nv = norm(b), norm(v)
    keys = set(nb) | set(nv)
    return sorted(keys, key=lambda k: -(alpha * nb.get(k, 0) + (1 - alpha) * nv.get(k, 0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench/nfcorpus"))
    args = ap.parse_args()
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    ix = open_index(load_settings(args.work / "home", models_dir=models))
    doc_of = {c: Path(p).stem for c, p in ix.db.execute(
        "SELECT c.id, f.path FROM chunks c JOIN files f ON f.id = c.file_id")}  # fmt: skip
    qrels = load_qrels()
    queries = [json.loads(x) for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    lists = [(q["_id"], *doc_lists(ix, q["text"], doc_of)) for q in queries]
    strategies = {
        "bm25": lambda b, v: list(b),
        "vector": lambda b, v: list(v),
        **{f"rrf_k{k}": (lambda b, v, k=k: [d for d, _ in rrf([list(b), list(v)], k=k)])
           for k in (10, 30, 60, 100)},
        **{f"rrf_k60_wv{w}": (lambda b, v, w=w: [d for d, _ in rrf([list(b), list(v)], [1, w])])
           for w in (0.7, 1.3, 1.6)},
        **{f"convex_a{a}": (lambda b, v, a=a: convex(b, v, a)) for a in (0.3, 0.5, 0.7)},
    }  # fmt: skip
    out = {}
    for name, fn in strategies.items():
        nd, rc = [], []
        for qid, b, v in lists:
            ranked = fn(b, v)
            nd.append(ndcg10(ranked, qrels[qid]))
            rc.append(recall100(ranked, qrels[qid]))
        out[name] = {"ndcg@10": round(statistics.mean(nd), 4),
                     "recall@100": round(statistics.mean(rc), 4)}  # fmt: skip
    by_codec = {}
    exact = saved_vectors(ix, args.work)
    if exact is not None:  # the same fusion (RRF k=60) over each codec's vectors
        qv = ix.embedder.embed([q["text"] for q in queries])
        for name, c in CODECS.items():
            vs = VectorSet(c, exact.ids, c.encode(exact.mat))
            nd, ndv = [], []
            for q, v in zip(queries, qv, strict=True):
                b, vv = doc_lists(ix, q["text"], doc_of, vs, v)
                ranked = [d for d, _ in rrf([list(b), list(vv)])]
                nd.append(ndcg10(ranked, qrels[q["_id"]]))
                ndv.append(ndcg10(list(vv), qrels[q["_id"]]))
            by_codec[name] = {"hybrid_ndcg@10": round(statistics.mean(nd), 4),
                              "vector_ndcg@10": round(statistics.mean(ndv), 4)}  # fmt: skip
    print(json.dumps({"bench": "index_fusion", "queries": len(lists), "strategies": out,
                      "codecs_rrf_k60": by_codec}))  # fmt: skip


if __name__ == "__main__":
    main()
