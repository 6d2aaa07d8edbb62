"""Vector designs side by side: storage per chunk, recall@10 against exact float32 cosine, and
query latency at the corpus size and at a synthetic 100k+ chunks.

Input: the float32 chunk and query vectors that bench/index_nfcorpus.py saved (NFCorpus chunks
embedded by the index's own chunker and MiniLM). Designs:
- f32: exact brute force (the reference);
- the index's codecs (localai/index/vectors.py: int8, q4r, int4, bin1, ...), scored
  asymmetrically, and re-scored exactly over their top K (`rerank_depth`: the recall a design
  that recomputes the candidates' embeddings from their text would reach);
- PQ-m (product quantisation, m sub-vectors × 8 bits, k-means trained on the corpus itself,
  asymmetric distance tables): the trained alternative;
- hnsw: hnswlib's graph over float32 (what most local RAG stores do), for latency;
- bin1_adaptive_rescore: how many candidates a re-scoring that stops early would need
  (`adaptive_rescore`).
The synthetic scale-up tiles the corpus vectors with small noise and renormalises, which keeps
the neighbourhood structure realistic enough for latency (not for recall). Prints one JSON.

    python bench/index_vectors.py [--work /tmp/localai-bench/nfcorpus] [--scale 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localai.index.vectors import CODECS, VectorSet  # noqa: E402


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ x.T  # (Q, N)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1)


def recall(approx: list[np.ndarray], exact: np.ndarray, k: int = 10) -> float:
    return float(
        np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact, strict=True)])
    )


def rerank_depth(vs, x: np.ndarray, qs: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Recall@10 when the codec's top K are re-scored exactly (what a design that recomputes
    the candidates' embeddings from their text would return), by K."""
    out = {}
    for depth in (12, 16, 24, 32, 48, 64, 100):
        got = []
        for q in qs:
            cand = vs.search(q, depth)[0]
            got.append(cand[np.argsort(-(x[cand] @ q), kind="stable")][:10])
        out[str(depth)] = round(recall(got, exact), 4)
    return out


def adaptive_rescore(x: np.ndarray, qs: np.ndarray, exact: np.ndarray) -> dict[str, dict]:
    """How few candidates re-scoring could get away with if it stopped early: 1-bit codes after
    the index's rotation, each scored with the unbiased estimate <q, sign> / <sign, o> (the
    per-vector factor would cost one more byte), re-scored exactly in that order until the
    next candidate's estimate plus a margin falls below the 10th exact score found so far.
    Per margin: recall@10 and how many candidates were re-scored (p50 / mean / p90). Not a
    design in the index: it sizes the best case for the storage-light path."""
    from localai.index.vectors import DIM, _rotation

    y = x @ _rotation()
    est = (qs @ _rotation()) @ (np.sign(y) / np.sqrt(DIM)).T
    est /= np.abs(y).sum(axis=1) / np.sqrt(DIM)  # / <sign/sqrt(D), o>
    scores = qs @ x.T
    out = {}
    for margin in (0.02, 0.03, 0.04, 0.05, 0.06):
        got, counts = [], []
        for i in range(len(qs)):
            order = np.argsort(-est[i])
            n = 10
            while n < len(order):
                kth = np.partition(scores[i, order[:n]], n - 10)[n - 10]
                if est[i, order[n]] + margin < kth:
                    break
                n += 1
            sel = order[:n]
            got.append(sel[np.argsort(-scores[i, sel])][:10])
            counts.append(n)
        out[str(margin)] = {"recall@10": round(recall(got, exact), 4),
                            "rescored_p50": float(np.median(counts)),
                            "rescored_mean": round(float(np.mean(counts)), 1),
                            "rescored_p90": float(np.percentile(counts, 90))}  # fmt: skip
    return out


def timed(fn, queries: np.ndarray) -> tuple[list, float, float]:
    out, ts = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        ts.append(time.perf_counter() - t)
    ts.sort()
    return out, 1000 * ts[len(ts) // 2], 1000 * ts[int(len(ts) * 0.99)]


class PQ:
    """m sub-vectors, 256 centroids each (one byte), k-means with a fixed seed."""

    def __init__(self, x: np.ndarray, m: int, iters: int = 12, seed: int = 0):
        self.m, self.d = m, x.shape[1] // m
        rng = np.random.default_rng(seed)
        self.cent = np.zeros((m, 256, self.d), dtype=np.float32)
        for j in range(m):
            sub = x[:, j * self.d : (j + 1) * self.d]
            c = sub[rng.choice(len(sub), 256, replace=len(sub) < 256)].copy()
            for _ in range(iters):
                a = np.argmin(((sub[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
                for t in range(256):
                    pts = sub[a == t]
                    if len(pts):
                        c[t] = pts.mean(0)
            self.cent[j] = c

    def encode(self, x: np.ndarray) -> np.ndarray:
        codes = np.zeros((len(x), self.m), dtype=np.uint8)
        for j in range(self.m):
            sub = x[:, j * self.d : (j + 1) * self.d]
            codes[:, j] = np.argmin(((sub[:, None, :] - self.cent[j][None]) ** 2).sum(-1), 1)
        return codes

    def search(self, codes: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
        table = np.einsum("mkd,md->mk", self.cent, q.reshape(self.m, self.d))  # (m, 256)
        s = table[np.arange(self.m)[None, :], codes].sum(1)  # (N,)
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top])]


def scale_up(x: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    reps = -(-n // len(x))
    big = np.tile(x, (reps, 1))[:n] + rng.normal(0, 0.02, (n, x.shape[1])).astype(np.float32)
    return big / np.linalg.norm(big, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench/nfcorpus"))
    ap.add_argument("--scale", type=int, default=100_000)
    ap.add_argument("--text-bytes-per-chunk", type=float, default=None)
    args = ap.parse_args()
    x = np.load(args.work / "chunk_vectors.npy").astype(np.float32)
    qs = np.load(args.work / "query_vectors.npy").astype(np.float32)
    tb = args.text_bytes_per_chunk
    if tb is None and (args.work / "home" / "index.db").exists():  # the index_nfcorpus run's
        import pysqlite3.dbapi2 as sqlite3

        db = sqlite3.connect(str(args.work / "home" / "index.db"))
        text = db.execute("SELECT sum(text_bytes) FROM files").fetchone()[0]
        tb = text / db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        db.close()
    exact = exact_top(x, qs, 10)
    ids = np.arange(len(x), dtype=np.int64)
    rows = {}
    for name, c in CODECS.items():
        vs = VectorSet(c, ids, c.encode(x))
        got, p50, p99 = timed(lambda q, vs=vs: vs.search(q, 10)[0], qs)
        rows[name] = {"bytes": c.nbytes, "recall@10": round(recall(got, exact), 4),
                      "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                      "rerank_depth": rerank_depth(vs, x, qs, exact)}  # fmt: skip
    for m in (48, 96):
        pq = PQ(x, m)
        codes = pq.encode(x)
        got, p50, p99 = timed(lambda q, pq=pq, codes=codes: pq.search(codes, q, 10), qs)
        r = {"bytes": m, "recall@10": round(recall(got, exact), 4), "trained": True}
        rows[f"pq{m}"] = {**r, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
    try:
        import hnswlib

        h = hnswlib.Index(space="ip", dim=x.shape[1])
        h.init_index(max_elements=len(x), ef_construction=200, M=16)
        h.add_items(x, ids)
        h.set_ef(64)
        got, p50, p99 = timed(lambda q: h.knn_query(q, k=10)[0][0], qs)
        rows["hnsw_f32"] = {"bytes": x.shape[1] * 4 + 16 * 2 * 4, "recall@10": round(
            recall(got, exact), 4), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}  # fmt: skip
    except ImportError:
        pass
    if tb:
        for r in rows.values():
            r["share_of_text"] = round(r["bytes"] / tb, 4)
    big = scale_up(x, args.scale)
    big_ids = np.arange(len(big), dtype=np.int64)
    scale_rows = {}
    for name in CODECS:
        c = CODECS[name]
        vs = VectorSet(c, big_ids, c.encode(big))
        _, p50, p99 = timed(lambda q, vs=vs: vs.search(q, 100), qs[:100])
        scale_rows[name] = {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                            "ram_mb": round(vs.nbytes / 1e6, 1)}  # fmt: skip
    print(json.dumps({
        "bench": "index_vectors", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"), "chunks": len(x), "queries": len(qs),
        "text_bytes_per_chunk": tb, "designs": rows,
        "bin1_adaptive_rescore": adaptive_rescore(x, qs, exact), "scale": {"chunks": args.scale,
                                                                "designs": scale_rows},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
