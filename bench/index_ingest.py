"""Ingest throughput: the whole indexing pipeline against the bare embedder, side by side.

The baseline is the embedder alone (Embedder.embed on the very chunk texts the index makes, in
batches of 64), which bounds what any pipeline on this model can do; localai's side is a fresh
`Index.update` over the same documents written as files (walk, read, hash, load, chunk, embed,
encode, one sqlite transaction per file). Both are measured with the embedder's default backend
and with the int8 ONNX one ("old", the only backend before the bf16 path). Runs alternate so
machine noise hits all four. Documents: the first N NFCorpus documents. Prints one JSON object;
ratio = index / embedder, speedup = index / old index.

    python bench/index_ingest.py [--docs 100] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_nfcorpus import write_corpus  # noqa: E402

from localai.catalog import Catalog  # noqa: E402
from localai.config import load_settings  # noqa: E402
from localai.index.chunker import chunk  # noqa: E402
from localai.index.embedder import Embedder  # noqa: E402
from localai.index.facade import Index  # noqa: E402
from localai.index.loaders import load_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    work = Path(tempfile.mkdtemp(prefix="localai-ingest-"))
    try:
        write_corpus(work / "docs", args.docs)
        settings = load_settings(work / "home", models_dir=models)
        cat = Catalog(settings.models_dir)
        name = settings.embed_model
        model, tok = cat.file(name, "model.onnx"), cat.file(name, "tokenizer.json")
        emb = Embedder(model, tok, settings.threads)
        old = Embedder(model, tok, settings.threads, backend="onnx-int8")

        def count(texts):
            encs = emb.tokenizer.encode_batch(texts, add_special_tokens=False)
            return [len(e.ids) for e in encs]

        texts = []
        for p in sorted((work / "docs").iterdir()):
            data = p.read_bytes()
            texts += [c.text for c in chunk(load_text(data, p), data, count)]
        emb.embed(texts[:8]), old.embed(texts[:8])  # warm up
        runs: dict[str, list[float]] = {"embedder": [], "index": [], "old_embedder": [],
                                        "old_index": []}  # fmt: skip
        for _ in range(args.runs):
            for prefix, e in (("", emb), ("old_", old)):
                t = time.perf_counter()
                for i in range(0, len(texts), 64):
                    e.embed(texts[i : i + 64])
                runs[prefix + "embedder"].append(len(texts) / (time.perf_counter() - t))
                shutil.rmtree(work / "home", ignore_errors=True)
                ix = Index.open(settings, embedder=e)
                ix.add_source(work / "docs")
                st = ix.update()
                ix.close()
                runs[prefix + "index"].append(st.embedded / st.seconds)
        best = {k: max(v) for k, v in runs.items()}
        print(json.dumps({"bench": "index_ingest", "machine": f"{platform.machine()} "
                          f"{os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"),
                          "load_avg_1m": round(os.getloadavg()[0], 2), "chunks": len(texts),
                          "backends": {"new": emb.backend, "old": old.backend},
                          "embedder_chunks_per_s": round(best["embedder"], 2),
                          "index_chunks_per_s": round(best["index"], 2),
                          "ratio": round(best["index"] / best["embedder"], 3),
                          "old_embedder_chunks_per_s": round(best["old_embedder"], 2),
                          "old_index_chunks_per_s": round(best["old_index"], 2),
                          "speedup": round(best["index"] / best["old_index"], 2),
                          "runs": {k: [round(x, 2) for x in v]
                                   for k, v in runs.items()}}))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
