"""FTS5 layouts for BM25: bytes on disk vs ranking quality on NFCorpus (../shared/evals).

Each variant indexes the same chunks (the index's own loader and chunker over NFCorpus documents,
no embedding needed) into a fresh sqlite file with the index's tokenizer, and runs the 323 test
queries the way Index.search does (fts_query → ORDER BY rank → best chunk per document):
- stored: a normal FTS5 table (keeps a second copy of the text, the usual RAG-store layout);
- contentless detail=full / column / none (`content=''`, what localai uses; smaller `detail`
  drops positions, then column lists, which bm25() partly relies on).
Prints one JSON object: bytes / text_bytes, nDCG@10, Recall@100, p50 query ms per variant.

    python bench/index_fts.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pysqlite3.dbapi2 as sqlite3  # noqa: E402
from index_nfcorpus import EVALS, load_qrels, ndcg10, recall100  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from localai.catalog import Catalog  # noqa: E402
from localai.index.chunker import chunk  # noqa: E402
from localai.index.fusion import fts_query, fts_text  # noqa: E402
from localai.index.loaders import load_text  # noqa: E402
from localai.index.store import TOKENIZER  # noqa: E402

VARIANTS = {
    "stored": "",
    "contentless_full": ", content='', contentless_delete=1",
    "contentless_column": ", content='', contentless_delete=1, detail=column",
    "contentless_none": ", content='', contentless_delete=1, detail=none",
    "contentless_full_nostop": ", content='', contentless_delete=1",
}


def corpus_chunks() -> tuple[list[tuple[str, str]], int]:
    models = Path(os.environ.get("LOCALAI_MODELS", Path.home() / ".cache/localai-test/models"))
    tok = Tokenizer.from_file(str(Catalog(models).file("minilm-l6-int8", "tokenizer.json")))
    tok.no_padding()
    tok.no_truncation()

    def count(texts):
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

    out, text_bytes = [], 0
    for line in (EVALS / "corpus.jsonl").read_text().splitlines():
        d = json.loads(line)
        data = (d["title"] + " " + d["text"]).encode()
        blocks = load_text(data, Path("x.txt"))
        text_bytes += sum(len(b.text.encode()) for b in blocks)
        out += [(d["_id"], c.text) for c in chunk(blocks, data, count)]
    return out, text_bytes


def run(variant: str, opts: str, chunks, text_bytes: int, queries, qrels) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fts.db"
        db = sqlite3.connect(str(path), isolation_level=None)
        db.execute(f"CREATE VIRTUAL TABLE fts USING fts5(text{opts}, tokenize='{TOKENIZER}')")
        db.execute("BEGIN")
        prep = fts_text if variant.endswith("nostop") else (lambda t: t)
        db.executemany("INSERT INTO fts (rowid, text) VALUES (?, ?)",
                       [(i, prep(t)) for i, (_, t) in enumerate(chunks)])  # fmt: skip
        db.execute("COMMIT")
        db.execute("INSERT INTO fts(fts) VALUES ('optimize')")
        db.execute("VACUUM")
        size = path.stat().st_size
        nd, rc, ts = [], [], []
        for q in queries:
            t = time.perf_counter()
            rows = db.execute("SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY rank LIMIT 300",
                              [fts_query(q["text"])]).fetchall()  # fmt: skip
            ts.append(time.perf_counter() - t)
            ranked = list(dict.fromkeys(chunks[r[0]][0] for r in rows))[:100]
            nd.append(ndcg10(ranked, qrels[q["_id"]]))
            rc.append(recall100(ranked, qrels[q["_id"]]))
        db.close()
    ts.sort()
    return {
        "bytes_share_of_text": round(size / text_bytes, 4),
        "ndcg@10": round(sum(nd) / len(nd), 4),
        "recall@100": round(sum(rc) / len(rc), 4),
        "p50_ms": round(1000 * ts[len(ts) // 2], 2),
    }


def main() -> None:
    chunks, text_bytes = corpus_chunks()
    qrels = load_qrels()
    queries = [json.loads(x) for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    only = sys.argv[1:] or list(VARIANTS)
    res = {v: run(v, VARIANTS[v], chunks, text_bytes, queries, qrels) for v in only}
    machine = f"{platform.machine()} {os.cpu_count()} cpus"
    print(json.dumps({"bench": "index_fts", "machine": machine, "date": time.strftime("%Y-%m-%d"),
                      "chunks": len(chunks), "text_bytes": text_bytes,
                      "bm25_baseline_ndcg@10": 0.3187, "variants": res}))  # fmt: skip


if __name__ == "__main__":
    main()
