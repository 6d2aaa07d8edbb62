"""FTS5 layouts for BM25: bytes on disk vs ranking quality on NFCorpus (../shared/evals).

Each variant indexes the same chunks (the index's own loader and chunker over NFCorpus documents,
no embedding needed) into a fresh sqlite file with the index's tokenizer, and runs the 323 test
queries the way Index.search does (fts_query → 300 best chunks → best chunk per document):
- stored: a normal FTS5 table (keeps a second copy of the text, the usual RAG-store layout);
- contentless detail=full / column / none (`content=''`; detail=full is what localai used
  before none_tf24_one became its layout "tf", localai/index/bm25.py); smaller `detail` drops
  positions, then column lists, which bm25() partly relies on: with detail=none every
  bm25() score is 0, so `ORDER BY rank` is rowid order);
- none_own_bm25 / none_tf2 / none_tf24 / none_tf24_one: a contentless detail=none table of
  stopword-free words ranked by our own BM25 (`OwnBM25`, FTS5's formula and constants) from the
  posting lists, with tf estimated from nothing (tf = 1), or from extra detail=none tables that
  hold, per chunk, the terms it repeats ≥ 2 (and ≥ 4) times: tf ≈ the largest threshold the term
  passes, else 1 (so 1, 2 or 4). `_one` keeps both thresholds in one table, the ≥ 4 terms
  written as `term=4`, which saves the second table's per-row %_docsize.
Prints one JSON object: bytes / text_bytes, nDCG@10, Recall@100, p50/p99 query ms per variant,
plus checks: the own scorer given exact tf reproduces bm25() on the detail=full table, and the
repeated-term tables hold exactly the (chunk, term) pairs written. `--scale N` instead times the
query path of detail=full bm25() and of none_tf24_one on N synthetic chunks (index_scale.py's
recipe; bytes there are relative to the synthetic text, quality is not measured).

    python bench/index_fts.py [VARIANT ...] [--scale 100000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

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
# Own-scored variants: where the repeated terms go, as (table, marker, threshold) — a chunk's
# row in `table` holds term + marker for each term it has ≥ threshold times.
OWN = {
    "none_own_bm25": (),
    "none_tf2": (("fts_tf2", "", 2),),
    "none_tf24": (("fts_tf2", "", 2), ("fts_tf4", "", 4)),
    "none_tf24_one": (("fts_tf", "", 2), ("fts_tf", "=4", 4)),
}
NONE = ", content='', contentless_delete=1, detail=none"
# The repeated-term tables receive FTS5's own terms (already stemmed and folded); a second porter
# pass would stem some stems again ("agre" → "agr"), so they only split on spaces and fold. '='
# never occurs in an index term (it separates tokens there), so `term=4` cannot collide.
TF_TOKENIZER = "unicode61 remove_diacritics 2 tokenchars '='"
K1, B = 1.2, 0.75  # FTS5 bm25() defaults
DEPTH = 300  # Index.search's BM25 list depth for k=100


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


def synthetic_texts(n: int) -> tuple[list[str], int]:
    """index_scale.py's synthetic chunks (8 random NFCorpus sentences each) as FTS receives
    them, and their text bytes."""
    rng = random.Random(0)
    sentences = []
    for line in (EVALS / "corpus.jsonl").read_text().splitlines():
        sentences += json.loads(line)["text"].split(". ")
    texts = [". ".join(rng.choice(sentences) for _ in range(8)) for _ in range(n)]
    return [fts_text(t) for t in texts], sum(len(t.encode()) for t in texts)


def repeated_terms(texts: list[str], ks: tuple[int, ...]) -> dict[int, list[list[str]]]:
    """For each threshold k, each text's terms that occur ≥ k times in it. Terms and counts come
    from FTS5 itself (an fts5vocab 'instance' table over a detail=full scratch table with the
    index's tokenizer), so they are exactly the terms the detail=none table indexes."""
    if not ks:
        return {}
    mem = sqlite3.connect(":memory:", isolation_level=None)
    mem.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, content='', tokenize='{TOKENIZER}')")
    mem.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
    out: dict[int, list[list[str]]] = {k: [[] for _ in texts] for k in ks}
    for lo in range(0, len(texts), 2000):
        mem.execute("INSERT INTO t(t) VALUES ('delete-all')")
        mem.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)",
                        enumerate(texts[lo : lo + 2000], start=lo))  # fmt: skip
        rows = mem.execute("SELECT doc, term, count(*) FROM v GROUP BY doc, term "
                           "HAVING count(*) >= ?", [min(ks)])  # fmt: skip
        for doc, term, n in rows:
            for k in ks:
                if n >= k:
                    out[k][doc].append(term)
    mem.close()
    return out


def build(db, opts: str, texts: list[str], layout: tuple = ()) -> dict:
    """The FTS table `fts` (plus the repeated-term tables of `layout`, see OWN), optimized;
    returns the checks."""
    db.execute(f"CREATE VIRTUAL TABLE fts USING fts5(text{opts}, tokenize='{TOKENIZER}')")
    db.execute("BEGIN")
    db.executemany("INSERT INTO fts (rowid, text) VALUES (?, ?)", enumerate(texts))
    db.execute("COMMIT")
    db.execute("INSERT INTO fts(fts) VALUES ('optimize')")
    checks = {}
    terms = repeated_terms(texts, tuple(k for _, _, k in layout))
    if layout:
        db.execute("CREATE VIRTUAL TABLE temp.r USING fts5vocab(main, fts, row)")
        vocab = {t for (t,) in db.execute("SELECT term FROM temp.r")}
        db.execute("DROP TABLE temp.r")
        checks["repeated_terms_all_in_index_vocab"] = all(
            t in vocab for ts in terms.values() for row in ts for t in row
        )
    for name in dict.fromkeys(t for t, _, _ in layout):
        rows = [[] for _ in texts]
        for _, mark, k in (x for x in layout if x[0] == name):
            for i, ts in enumerate(terms[k]):
                rows[i] += [t + mark for t in ts]
        db.execute(f'CREATE VIRTUAL TABLE {name} USING fts5(text{NONE}, tokenize="{TF_TOKENIZER}")')
        db.execute("BEGIN")
        db.executemany(f"INSERT INTO {name} (rowid, text) VALUES (?, ?)",
                       [(i, " ".join(ts)) for i, ts in enumerate(rows) if ts])  # fmt: skip
        db.execute("COMMIT")
        db.execute(f"INSERT INTO {name}({name}) VALUES ('optimize')")
        db.execute(f"CREATE VIRTUAL TABLE temp.v USING fts5vocab(main, {name}, instance)")
        got = set(db.execute("SELECT doc, term FROM temp.v"))
        db.execute("DROP TABLE temp.v")
        want = {(i, t) for i, ts in enumerate(rows) for t in ts}
        checks[f"{name}_pairs"] = len(want)
        checks[f"{name}_pairs_read_back_equal"] = got == want
    return checks


def varint(b: bytes) -> int:
    """SQLite's varint (big-endian 7-bit groups, 9th byte whole), as FTS5 writes %_docsize."""
    v = 0
    for i, c in enumerate(b):
        if i == 8:
            return (v << 8) | c
        v = (v << 7) | (c & 0x7F)
        if not c & 0x80:
            break
    return v


class OwnBM25:
    """BM25 over the posting lists of a detail=none table, with FTS5 bm25()'s formula:
    Σ idf · tf·(k1+1) / (tf + k1·(1 − b + b·dl/avgdl)), idf = log((N − df + 0.5)/(df + 0.5))
    floored at 1e-6. dl comes from %_docsize (kept for any detail), read once into RAM like
    the vector cache; tf comes from `tf_of` (default: the repeated-term tables)."""

    def __init__(self, db, layout: tuple = (), table: str = "fts"):
        self.db, self.layout, self.table = db, layout, table
        t = time.perf_counter()
        rows = db.execute(f"SELECT id, sz FROM {table}_docsize").fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        self.dl = np.zeros(int(ids.max()) + 1)  # by rowid
        self.dl[ids] = [varint(r[1]) for r in rows]
        self.n, self.avgdl = len(rows), self.dl.sum() / len(rows)
        self.load_ms = 1000 * (time.perf_counter() - t)
        # query words → FTS5's terms, through the same tokenizer (for the repeated-term tables)
        db.execute(f"CREATE VIRTUAL TABLE temp.q USING fts5(w, tokenize='{TOKENIZER}')")
        db.execute("CREATE VIRTUAL TABLE temp.qv USING fts5vocab(temp, q, instance)")
        self.dropped = 0  # query words that are not exactly one FTS5 term (none on NFCorpus)
        self.not_subset = 0  # repeated-term postings outside the term's postings (must stay 0)

    def postings(self, table: str, term: str) -> np.ndarray:
        cur = self.db.execute(f"SELECT rowid FROM {table} WHERE {table} MATCH ?", [term])
        return np.fromiter((r[0] for r in cur), np.int64)

    def terms(self, words: list[str]) -> list[list[str]]:
        self.db.execute("DELETE FROM temp.q")
        self.db.executemany("INSERT INTO temp.q (rowid, w) VALUES (?, ?)", enumerate(words))
        got = defaultdict(list)
        for doc, term in self.db.execute("SELECT doc, term FROM temp.qv ORDER BY doc, offset"):
            got[doc].append(term)
        return [got[i] for i in range(len(words))]

    def tf_from_tables(self, term: str, post: np.ndarray) -> np.ndarray:
        tf = np.ones(len(post))
        for table, mark, k in self.layout:  # ascending thresholds: the largest passed wins
            hit = self.postings(table, f'"{term}{mark}"')
            self.not_subset += int((~np.isin(hit, post, assume_unique=True)).sum())
            tf[np.isin(post, hit, assume_unique=True)] = k
        return tf

    def search(self, query: str, n: int, tf_of=None) -> tuple[np.ndarray, np.ndarray]:
        """The n best rowids and their scores, best first (ties: smaller rowid)."""
        q = fts_query(query)
        if q is None:
            return np.zeros(0, np.int64), np.zeros(0)
        # fts_query's words, split where FTS5 would (a multi-token phrase is an error on
        # detail=none); each distinct word is one query term, like one bm25() phrase
        words = [w.strip('"') for w in q.split(" OR ")]
        words = list(dict.fromkeys(p for w in words for p in w.split("_") if p))
        ids, weights = [], []
        for word, terms in zip(words, self.terms(words), strict=True):
            if len(terms) != 1:
                self.dropped += 1
                continue
            post = self.postings(self.table, f'"{word}"')
            if not len(post):
                continue
            df = len(post)
            idf = max(math.log((self.n - df + 0.5) / (df + 0.5)), 1e-6)
            tf = (tf_of or self.tf_from_tables)(terms[0], post)
            norm = K1 * (1 - B + B * self.dl[post] / self.avgdl)
            ids.append(post)
            weights.append(idf * tf * (K1 + 1) / (tf + norm))
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0)
        score = np.bincount(np.concatenate(ids), np.concatenate(weights), len(self.dl))
        cand = np.flatnonzero(score)
        if len(cand) > n:  # keep every tie of the n-th score, so ties go to the smaller rowid
            cand = cand[score[cand] >= np.partition(score[cand], len(cand) - n)[len(cand) - n]]
        order = np.lexsort((cand, -score[cand]))[:n]
        return cand[order], score[cand][order]


def scorer_check(texts: list[str], queries) -> dict:
    """The own scorer with exact tf (from fts5vocab) against bm25() on the detail=full table:
    same top-300 order and scores, so its formula, idf, dl and avgdl are FTS5's."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    build(db, VARIANTS["contentless_full_nostop"], texts)
    db.execute("CREATE VIRTUAL TABLE temp.vi USING fts5vocab(main, fts, instance)")

    def exact_tf(term, post):
        sql = "SELECT doc, count(*) FROM temp.vi WHERE term = ? GROUP BY doc"
        tf = dict(db.execute(sql, [term]))
        return np.array([tf[i] for i in post.tolist()], float)

    own = OwnBM25(db)
    same, diff = 0, 0.0
    for q in queries:
        fq = fts_query(q["text"])
        ref = db.execute("SELECT rowid, -bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY rank, "
                         "rowid LIMIT ?", [fq, DEPTH]).fetchall()  # fmt: skip
        ids, score = own.search(q["text"], DEPTH, exact_tf)
        same += [r[0] for r in ref] == ids.tolist()
        diff = max([diff] + [abs(r[1] - s) for r, s in zip(ref, score.tolist(), strict=False)])
    db.close()
    return {"queries_same_order": same, "queries": len(queries), "max_abs_score_diff": diff}


def percentiles(ts: list[float]) -> dict:
    ts = sorted(ts)
    return {"p50_ms": round(1000 * ts[len(ts) // 2], 2),
            "p99_ms": round(1000 * ts[int(len(ts) * 0.99)], 2)}  # fmt: skip


def run(variant: str, texts: list[str], doc_of: list[str] | None, text_bytes: int,
        queries, qrels) -> dict:  # fmt: skip
    """Build one variant in a fresh file, measure its bytes, run the queries. doc_of=None
    (synthetic chunks) times the query path only."""
    own = variant in OWN
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fts.db"
        db = sqlite3.connect(str(path), isolation_level=None)
        t = time.perf_counter()
        checks = build(db, NONE if own else VARIANTS[variant], texts, OWN.get(variant, ()))
        build_s = time.perf_counter() - t
        db.execute("VACUUM")
        size = path.stat().st_size
        scorer = OwnBM25(db, OWN[variant]) if own else None
        nd, rc, ts = [], [], []
        for q in queries:
            t = time.perf_counter()
            if own:
                rows = scorer.search(q["text"], DEPTH)[0].tolist()
            else:
                rows = [r[0] for r in db.execute(
                    "SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY rank LIMIT ?",
                    [fts_query(q["text"]), DEPTH])]  # fmt: skip
            ts.append(time.perf_counter() - t)
            if doc_of is not None:
                ranked = list(dict.fromkeys(doc_of[r] for r in rows))[:100]
                nd.append(ndcg10(ranked, qrels[q["_id"]]))
                rc.append(recall100(ranked, qrels[q["_id"]]))
        db.close()
    out = {"bytes_share_of_text": round(size / text_bytes, 4), "bytes": size}
    if nd:
        out |= {"ndcg@10": round(sum(nd) / len(nd), 4), "recall@100": round(sum(rc) / len(rc), 4),
                "per_query_ndcg": nd}  # fmt: skip
    out |= percentiles(ts) | {"build_s": round(build_s, 1)}
    if own:
        out |= {"dl_load_ms": round(scorer.load_ms, 1), "query_words_dropped": scorer.dropped,
                "tf_postings_outside_term_postings": scorer.not_subset, **checks}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", help=f"default: all of {[*VARIANTS, *OWN]}")
    ap.add_argument("--scale", type=int, help="time the query path on this many synthetic chunks")
    args = ap.parse_args()
    queries = [json.loads(x) for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    head = {"bench": "index_fts", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "date": time.strftime("%Y-%m-%d"),
            "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    if args.scale:
        texts, tb = synthetic_texts(args.scale)
        only = args.variants or ["contentless_full_nostop", "none_tf24_one"]
        res = {v: run(v, texts, None, tb, queries, None) for v in only}
        print(json.dumps(head | {"chunks": args.scale, "text_bytes": tb, "variants": res}))
        return
    chunks, text_bytes = corpus_chunks()
    qrels = load_qrels()
    doc_of = [d for d, _ in chunks]
    nostop = [fts_text(t) for _, t in chunks]
    res = {}
    for v in args.variants or [*VARIANTS, *OWN]:
        plain = v in VARIANTS and not v.endswith("nostop")
        res[v] = run(v, [t for _, t in chunks] if plain else nostop, doc_of, text_bytes,
                     queries, qrels)  # fmt: skip
    # paired difference to the layout the index uses: mean and its standard error over queries
    per_query = {v: np.array(r.pop("per_query_ndcg")) for v, r in res.items()}
    if "contentless_full_nostop" in per_query:
        for v, r in res.items():
            d = per_query[v] - per_query["contentless_full_nostop"]
            r["ndcg@10_minus_used"] = round(float(d.mean()), 4)
            r["paired_se"] = round(float(d.std(ddof=1) / np.sqrt(len(d))), 4)
    print(json.dumps(head | {"chunks": len(chunks), "text_bytes": text_bytes,
                             "bm25_baseline_ndcg@10": 0.3187, "variants": res,
                             "own_scorer_check": scorer_check(nostop, queries)}))  # fmt: skip


if __name__ == "__main__":
    main()
