"""Stage 4: check every citation in an answer against the file it points to.

For each [n] the answer uses: the passage is re-read from its file at the recorded lines (and
its content hash checked by the index), and for each answer sentence citing [n] the passage
sentence that best supports it is found. A citation is `verified` only when the file still
holds the passage and every one of those answer sentences shares enough of its words with its
passage sentence; otherwise it is flagged with the reason. `quote` is always text taken from
the re-read file (its supporting sentences), never from the model.

If the model cited nothing (small models often do not), each answer sentence that closely
matches a passage sentence is attributed to it, marked `inferred`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from ..index.readback import Passage, location
from ..index.search import Hit
from .retrieve import Source

CITE = re.compile(r"\[(\d{1,3})\]")
LEADING = re.compile(r"^(?:\s*\[\d{1,3}\])+")  # markers the model put after the full stop
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
WORD = re.compile(r"[^\W_]{3,}")
SUPPORT = 0.5  # share of the claim's words that the quoted sentence must contain
INFER = 0.6  # stricter, for attributions the model did not make itself
QUOTE_CHARS = 200
_STOP = """the and for are was were with that this from have has had not but you your its their
they them can will would should could into than then also"""
STOPWORDS = frozenset(_STOP.split())


@dataclass
class Citation:
    n: int
    path: str
    start_line: int
    end_line: int
    quote: str
    verified: bool
    reason: str = ""  # why it is not verified, or a note
    inferred: bool = False
    pages: tuple[int, int] | None = None  # for paged documents (PDF)

    @property
    def where(self) -> str:
        return location(self.path, self.start_line, self.end_line, self.pages)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Citation:
        """The inverse of as_dict; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in d.items() if k in known})
        c.pages = tuple(c.pages) if c.pages else None  # JSON gives a list
        return c


def words(text: str) -> set[str]:
    return {w for w in (m.lower() for m in WORD.findall(text)) if w not in STOPWORDS}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE.split(text) if s.strip()]


def best_support(passage: str, claim: str) -> tuple[str, float]:
    """The passage sentence holding most of the claim's words, and that share (0..1)."""
    want = words(claim)
    best, share = "", 0.0
    for sent in sentences(passage):
        got = len(want & words(sent)) / len(want) if want else 0.0
        if got > share:
            best, share = sent, got
    return best, share


def _quote(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1].rstrip() + "…"


def claims_by_number(answer: str) -> dict[int, str]:
    """Each cited number → the answer sentences that cite it (in order of first citation).
    A marker written after the full stop ("… in 1871. [1]") belongs to the sentence before it."""
    return {n: " ".join(s) for n, s in _cited_sentences(answer).items()}


def _cited_sentences(answer: str) -> dict[int, list[str]]:
    """claims_by_number's sentences kept apart: each one is checked on its own."""
    cited: list[tuple[str, list[int]]] = []
    for sent in sentences(answer):
        lead = LEADING.match(sent)
        if lead and cited:
            cited[-1][1].extend(int(m) for m in CITE.findall(lead.group()))
            sent = sent[lead.end() :].strip()
        if sent:
            cited.append((CITE.sub("", sent).strip(), [int(m) for m in CITE.findall(sent)]))
    out: dict[int, list[str]] = {}
    for claim, numbers in cited:
        for n in dict.fromkeys(numbers):
            out.setdefault(n, []).append(claim)
    return out


def check(n: int, src: Source | None, claims: list[str], reread: Callable[[Hit], Passage],
          threshold: float = SUPPORT, inferred: bool = False) -> Citation:  # fmt: skip
    """[n] checked against its passage as the file holds it now: every answer sentence in
    `claims` must be backed by one passage sentence (a passage sentence rarely holds the words
    of several answer sentences)."""
    if src is None:
        return Citation(n, "", 0, 0, "", False, f"the answer cites [{n}], which was not given")
    now = reread(src.hit)
    cit = Citation(n, now.path, now.start_line, now.end_line, "", False, now.reason, inferred,
                   now.pages)  # fmt: skip
    if not now.verified:
        return cit
    parts = [sent for sent in claims if words(sent)] or claims
    found = [best_support(now.text, sent) for sent in parts]
    quotes = list(dict.fromkeys(q for q, _ in found if q))
    cit.quote = _quote(" … ".join(quotes) or now.text.strip())
    if all(q and q in now.text and share >= threshold for q, share in found):
        cit.verified = True
    else:
        cit.reason = "the cited passage does not contain what the answer says"
    return cit


def cite(answer: str, used: list[Source], reread: Callable[[Hit], Passage]) -> list[Citation]:
    """Citations of `answer`, each checked against the file as it is now."""
    by_rank = {s.rank: s for s in used}
    claims = _cited_sentences(answer)
    if claims:
        return [check(n, by_rank.get(n), sents, reread) for n, sents in claims.items()]
    found: dict[int, list[str]] = {}
    for sent in sentences(answer):
        scored = [(best_support(s.passage.text, sent)[1], s.rank) for s in used]
        share, rank = max(scored, default=(0.0, 0))
        if share >= INFER and len(words(sent)) >= 3:
            found.setdefault(rank, []).append(sent)
    return [check(n, by_rank[n], c, reread, INFER, inferred=True)
            for n, c in found.items()]  # fmt: skip
