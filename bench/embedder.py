"""The embedder's backends side by side: speed and vector agreement on NFCorpus chunks.

"new" is what `Embedder(backend="auto")` picks on this machine (torch-bf16 where bf16 is native,
torch-fp32 elsewhere), "old" the onnxruntime int8 path that was the only one before; "fp32" is
the same safetensors in fp32 with plain torch ops (the reference model). `--isa avx2` runs the
whole bench again in a child process with torch and oneDNN capped to AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), as on a laptop without AVX-512 or AMX.
Chunks are the index's own (the chunker over the first N NFCorpus documents), embedded in
batches of 64 like the indexer does; runs alternate (old new old new) so machine noise hits
both, and the best run of each counts.

Agreement: mean and minimum cosine between the backends' vectors of the same chunk, and for the
NFCorpus test queries, recall@10 of exact search: the top 10 chunks with new vectors (queries and
chunks) against the top 10 with old ones, and "mixed" = new query vectors against old chunk
vectors (an index built before the switch, searched after it). Prints one JSON object.

    python bench/embedder.py [--docs 300] [--runs 3] [--min-tokens 0] [--isa avx2]

`--min-tokens 230` keeps only full-size chunks (the chunker's ~250-token target), the size the
ingest goal is stated for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localai.catalog import Catalog  # noqa: E402
from localai.config import load_settings  # noqa: E402
from localai.index.chunker import chunk  # noqa: E402
from localai.index.embedder import Embedder  # noqa: E402
from localai.index.loaders import load_text  # noqa: E402

EVALS = ROOT.parent / "shared" / "evals" / "nfcorpus"
BATCH = 64  # the indexer's EMBED_BATCH


def corpus_chunks(emb: Embedder, docs: int) -> list[str]:
    def count(texts):
        return [len(e.ids) for e in emb.tokenizer.encode_batch(texts, add_special_tokens=False)]

    texts = []
    with open(EVALS / "corpus.jsonl") as f:
        for n, line in enumerate(f):
            if n >= docs:
                break
            d = json.loads(line)
            data = (d["title"] + " " + d["text"]).encode()
            texts += [c.text for c in chunk(load_text(data, Path(d["_id"] + ".txt")), data, count)]
    return texts


def test_queries() -> list[str]:
    with open(EVALS / "qrels" / "test.tsv") as f:
        ids = {line.split("\t")[0] for line in list(f)[1:]}
    with open(EVALS / "queries.jsonl") as f:
        return [q["text"] for q in map(json.loads, f) if q["_id"] in ids]


def embed_all(emb: Embedder, texts: list[str]) -> np.ndarray:
    return np.concatenate([emb.embed(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])


def recall10(q_a, d_a, q_b, d_b) -> float:
    """Mean overlap of the top 10 by (q_a, d_a) with the top 10 by (q_b, d_b)."""
    top_a = np.argsort(-(q_a @ d_a.T), axis=1)[:, :10]
    top_b = np.argsort(-(q_b @ d_b.T), axis=1)[:, :10]
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_a, top_b, strict=True)]))


def chunk_gflop(tokens: float, layers: int = 6, dim: int = 384, ffn: int = 1536) -> float:
    """MiniLM's multiply-adds ×2 for one chunk of `tokens`: Q, K, V, O and the FFN per token,
    plus the attention scores and the weighted sum (T² per dim)."""
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * ffn)
    return layers * (linear + 4 * tokens * tokens * dim) / 1e9


def fp32_peak_gflops(threads: int, runs: int = 5) -> float:
    """What torch's fp32 matmul reaches here on the FFN's shape (64 chunks' tokens × 384 →
    1536): the ceiling any fp32 embedder can approach, measured rather than taken from specs."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(64 * 238, 384), torch.randn(384, 1536)
    a @ b  # warm up
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] * 384 * 1536 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--min-tokens", type=int, default=0)
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = ap.parse_args()
    if args.isa == "avx2" and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    settings = load_settings(tempfile.gettempdir(), models_dir=models)  # home is never written
    cat = Catalog(settings.models_dir)
    name = settings.embed_model
    cat.ensure(name, log=lambda m: print(m, file=sys.stderr))
    model, tok = cat.file(name, "model.onnx"), cat.file(name, "tokenizer.json")
    old = Embedder(model, tok, settings.threads, backend="onnx-int8")
    new = Embedder(model, tok, settings.threads)
    fp32 = Embedder(model, tok, settings.threads, backend="reference")

    texts = corpus_chunks(old, args.docs)
    sizes = [len(e.ids) for e in old._truncating.encode_batch(texts)]  # as embedded (truncated)
    texts = [t for t, n in zip(texts, sizes, strict=True) if n >= args.min_tokens]
    tokens = sum(n for n in sizes if n >= args.min_tokens)
    embed_all(old, texts[:8]), embed_all(new, texts[:8])  # warm up
    rates: dict[str, list[float]] = {"old": [], "new": []}
    vecs = {}
    for _ in range(args.runs):
        for key, emb in (("old", old), ("new", new)):
            t = time.perf_counter()
            vecs[key] = embed_all(emb, texts)
            rates[key].append(len(texts) / (time.perf_counter() - t))
    vecs["fp32"] = embed_all(fp32, texts)
    queries = test_queries()
    qv = {k: e.embed(queries) for k, e in (("old", old), ("new", new), ("fp32", fp32))}

    def cos(a, b):
        c = (vecs[a] * vecs[b]).sum(axis=1)
        return {"mean": round(float(c.mean()), 5), "min": round(float(c.min()), 5)}

    best = {k: max(v) for k, v in rates.items()}
    gflop = chunk_gflop(tokens / len(texts))
    peak = fp32_peak_gflops(settings.threads)
    print(json.dumps({
        "bench": "embedder", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "load_avg_1m": round(os.getloadavg()[0], 2), "threads": settings.threads,
        "isa": args.isa,
        "backends": {"old": old.backend, "new": new.backend},
        "chunks": len(texts), "mean_tokens": round(tokens / len(texts), 1),
        "chunks_per_s": {k: round(v, 2) for k, v in best.items()},
        "tokens_per_s": {k: round(v * tokens / len(texts)) for k, v in best.items()},
        "speedup": round(best["new"] / best["old"], 2),
        "gflop_per_chunk": round(gflop, 2), "fp32_peak_gflops": round(peak, 1),
        "fp32_peak_chunks_per_s": round(peak / gflop, 1),
        "fraction_of_fp32_peak": {k: round(v * gflop / peak, 3) for k, v in best.items()},
        "cosine": {"new_vs_old": cos("new", "old"), "new_vs_fp32": cos("new", "fp32"),
                   "old_vs_fp32": cos("old", "fp32")},
        "queries": len(queries),
        "recall@10": {
            "new_vs_old": round(recall10(qv["new"], vecs["new"], qv["old"], vecs["old"]), 4),
            "mixed_vs_old": round(recall10(qv["new"], vecs["old"], qv["old"], vecs["old"]), 4),
            "new_vs_fp32": round(recall10(qv["new"], vecs["new"], qv["fp32"], vecs["fp32"]), 4),
            "old_vs_fp32": round(recall10(qv["old"], vecs["old"], qv["fp32"], vecs["fp32"]), 4),
        },
        "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
