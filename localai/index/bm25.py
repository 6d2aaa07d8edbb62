"""BM25 over the index's small FTS layout ("tf"): posting lists without positions, plus tf.

Layout "tf" (every new index): `fts` is a contentless FTS5 table with detail=none, so each term
keeps only the list of chunks it occurs in; `fts_tf` (same kind) holds, for each chunk and each
term it repeats (tf ≥ 2), the binary digits of min(tf, 31) as marks: `term=1`, `term=2`, `term=4`,
`term=8`, `term=16` (tf 6 is `term=2 term=4`). A term's tf in a chunk is then known exactly up
to 31, one posting per set bit. Measured on NFCorpus, a coarser side table (tf known as 1, 2 or
4) already ranked as well as the detail=full table that FTS5's bm25() needs (nDCG@10 0.3227 vs
0.3232) at 0.185 of the text's bytes instead of 0.32 (bench/index_fts.py, BENCHMARKS.md); on
python3-doc, whose pages repeat their subject many times per chunk, capping tf at 4 lost one of
16 questions from BM25's top 10 (MRR 0.76 vs 0.84), and exact tf gives bm25()'s ranking back for
~0.02 of the text more. bm25() cannot rank a detail=none table (every score is 0), so `Scorer`
applies FTS5's bm25() formula and constants itself; given exact tf it reproduces bm25() exactly.

Terms are FTS5's own: the side table's rows are built from an fts5vocab view of a scratch table
with the index's tokenizer, and query words are mapped to terms the same way, so the side table
and the main table can never disagree on how a word is stemmed.
"""

from __future__ import annotations

import math
import re
import threading

import numpy as np
import pysqlite3.dbapi2 as sqlite3

TOKENIZER = "porter unicode61 remove_diacritics 2"
# The side table receives terms already stemmed and folded; a second porter pass would stem some
# again ("agre" → "agr"), so it only splits on spaces and folds. '=' never occurs in an index term
# (it separates tokens there), so a mark like `term=4` cannot collide with a term.
TF_TOKENIZER = "unicode61 remove_diacritics 2 tokenchars '='"
TF_BITS = (1, 2, 4, 8, 16)  # a repeated term's tf in binary, capped at their sum (31)
K1, B, IDF_FLOOR = 1.2, 0.75, 1e-6  # FTS5 bm25()'s constants
# One FTS5 token of a query word: unicode61 splits on what is not a letter or digit, and a
# detail=none table rejects a query word that is several tokens ("phrase queries are not
# supported"), so `foo_bar` is searched as `foo` and `bar`.
_PIECE = re.compile(r"[^\W_]+", re.UNICODE)

_scratch: sqlite3.Connection | None = None
_scratch_lock = threading.Lock()


def _terms(texts: list[str]) -> list[dict[str, int]]:
    """Each text's FTS5 terms (as the index's tokenizer stems them) and their counts."""
    global _scratch
    with _scratch_lock:
        if _scratch is None:
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.execute(
                f"CREATE VIRTUAL TABLE t USING fts5(text, content='', tokenize='{TOKENIZER}')"
            )
            db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, instance)")
            _scratch = db
        _scratch.execute("INSERT INTO t(t) VALUES ('delete-all')")
        _scratch.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)", enumerate(texts))
        out: list[dict[str, int]] = [{} for _ in texts]
        for doc, term, n in _scratch.execute("SELECT doc, term, count(*) FROM v GROUP BY 1, 2"):
            out[doc][term] = n
        return out


def term_counts(texts: list[str]) -> list[dict[str, int]]:
    """Each text's FTS5 terms and their counts: what any store's BM25 ranks by."""
    return _terms(texts)


def query_terms(words: list[str]) -> list[tuple[str, str]]:
    """(piece, term) for each distinct FTS5 token of the query words (fts_query's). A piece
    that is not one token for FTS5 either is left out: no detail=none query can say it."""
    pieces = list(dict.fromkeys(p for w in words for p in _PIECE.findall(w)))
    if not pieces:
        return []
    return [(p, next(iter(c))) for p, c in zip(pieces, _terms(pieces), strict=True)
            if len(c) == 1]  # fmt: skip


def bm25_term(tf: np.ndarray, df: int, n: int, norm: np.ndarray) -> np.ndarray:
    """One query term's share of FTS5's bm25() for the chunks holding it: tf its counts there,
    df how many chunks hold it, n chunks in all, norm K1 * (1 - B + B * dl / avgdl)."""
    idf = max(math.log((n - df + 0.5) / (df + 0.5)), IDF_FLOOR)
    return idf * tf * (K1 + 1) / (tf + norm)


def tf_rows(texts: list[str]) -> list[str]:
    """What `fts_tf` receives for each chunk's FTS text ("" when no term repeats)."""
    rows = []
    for counts in _terms(texts):
        marks = [f"{t}={b}" for t, n in sorted(counts.items()) if n >= 2
                 for b in TF_BITS if min(n, sum(TF_BITS)) & b]  # fmt: skip
        rows.append(" ".join(marks))
    return rows


def docsize_lengths(blobs: list[bytes]) -> np.ndarray:
    """Token counts from a one-column FTS5 %_docsize: each blob is one SQLite varint (big-endian
    7-bit groups, high bit = more follow); a chunk's count needs at most 3 bytes."""
    if not blobs:
        return np.zeros(0, np.int64)
    lens = np.fromiter(map(len, blobs), np.int64, len(blobs))
    assert lens.min() >= 1 and lens.max() <= 8, "not a one-column %_docsize varint"
    raw = np.frombuffer(b"".join(blobs), np.uint8).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    from_end = np.repeat(starts + lens, lens) - np.arange(len(raw)) - 1  # group index, last = 0
    return np.add.reduceat((raw & 0x7F) << (7 * from_end), starts)


class Scorer:
    """BM25 (FTS5's bm25() formula) over one generation of the "tf" layout. Holds each chunk's
    length from `fts_docsize`, read once per generation like the vector set."""

    def __init__(self, db):
        rows = db.execute("SELECT id, sz FROM fts_docsize ORDER BY id").fetchall()
        self.ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))  # sorted chunk ids
        dl = docsize_lengths([r[1] for r in rows]).astype(np.float64)
        self.n = len(rows)
        avgdl = dl.mean() if self.n else 1.0
        self.norm = K1 * (1 - B + B * dl / max(avgdl, 1e-9))  # by position in self.ids

    def search(self, db, words: list[str], n: int) -> list[int]:
        """The n best chunk ids for query words (fts_query's), best first; ties: smaller id.
        Each distinct word is one query term, as each is one phrase of bm25()'s OR query."""
        if not self.n:
            return []
        score = np.zeros(self.n)
        for piece, term in query_terms(words):
            pos = self._positions(_postings(db, "fts", f'"{piece}"'))
            if not len(pos):
                continue
            tf = np.zeros(len(pos))
            for b in TF_BITS:
                hit = self._positions(_postings(db, "fts_tf", f'"{term}={b}"'))
                tf[np.isin(pos, hit, assume_unique=True)] += b
            tf[tf == 0] = 1  # not in the side table: the term occurs once
            score[pos] += bm25_term(tf, len(pos), self.n, self.norm[pos])
        cand = np.flatnonzero(score)
        if len(cand) > n:  # keep every tie of the n-th score, so ties go to the smaller id
            cand = cand[score[cand] >= np.partition(score[cand], len(cand) - n)[len(cand) - n]]
        order = np.lexsort((cand, -score[cand]))[:n]
        return self.ids[cand[order]].tolist()

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of chunk ids in self.ids; ids written after this generation was read
        (a commit between the generation check and the query) are left out until the next."""
        pos = np.searchsorted(self.ids, ids)
        known = pos < self.n
        known[known] = self.ids[pos[known]] == ids[known]
        return pos[known]


def _postings(db, table: str, phrase: str) -> np.ndarray:
    cur = db.execute(f"SELECT rowid FROM {table} WHERE {table} MATCH ?", [phrase])
    return np.fromiter((r[0] for r in cur), np.int64)
