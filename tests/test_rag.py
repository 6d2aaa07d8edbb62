"""The RAG stages on a real index (real files, real MiniLM) and the real SmolLM2 tokenizer:
packing under a budget with the best passages at the edges, and citation checking against files
as they are now (changed files flag their citations)."""

from __future__ import annotations

import sys

import pytest

from localai.config import load_settings
from localai.engine import GenerationStats, Message
from localai.index.facade import Index
from localai.rag.answer import Answerer, NoQuestion, sources_text
from localai.rag.cite import SUPPORT, best_support, cite, claims_by_number
from localai.rag.prompt import (
    DEFAULT_LAYOUT,
    EXAMPLE_ANSWER,
    EXAMPLE_QUESTION,
    EXAMPLE_SOURCES,
    LAYOUTS,
    edges_first,
    pack,
)
from localai.rag.retrieve import retrieve

FACTS = {
    "lighthouse.md": "# Brightwater\n\nThe Brightwater lighthouse was built in 1871 by Maren "
    "Holt.\nIts lamp can be seen from 22 nautical miles away.\n",
    "garden.txt": "Tomatoes need six hours of direct sun each day.\n"
    "Water them deeply twice a week.\n",
    "bikes.md": "# Bikes\n\nOil the bicycle chain every month; check the tyres weekly.\n",
}


@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for name, text in FACTS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def index(home, embedder, docs):
    ix = Index.open(load_settings(home), embedder=embedder)
    ix.add_source(docs)
    ix.update()
    yield ix
    ix.close()


def test_edges_first_keeps_the_best_at_both_ends():
    assert edges_first([1, 2, 3, 4, 5, 6]) == [1, 3, 5, 6, 4, 2]
    assert edges_first([1]) == [1]


def test_retrieve_ranks_and_filters_by_source(index, docs):
    found = retrieve(index, "When was the Brightwater lighthouse built?", k=3)
    assert found.sources[0].passage.path.endswith("lighthouse.md") and found.stale == 0
    assert [s.rank for s in found.sources] == list(range(1, len(found.sources) + 1))
    only = retrieve(index, "lighthouse", k=3, source=docs / "garden.txt")
    assert {s.passage.path for s in only.sources} == {str(docs / "garden.txt")}


def test_pack_drops_what_does_not_fit_and_says_so(index, engine):
    found = retrieve(index, "lighthouse tomatoes bicycle", k=3)
    history = [Message("user", "lighthouse tomatoes bicycle?")]
    roomy = pack(engine, history, found.sources, answer_tokens=64)
    assert len(roomy.used) == 3 and roomy.dropped == 0
    given = "\n".join(m.content for m in roomy.messages)
    assert all(f"[{s.rank}] {s.where}" in given for s in found.sources)
    tight = pack(engine, history, found.sources, answer_tokens=engine.context_length - 220)
    assert tight.dropped >= 1 and len(tight.used) + tight.dropped == 3


def test_citations_are_checked_against_the_file(index, engine, docs):
    rag = Answerer(index, engine)
    prep = rag.prepare([Message("user", "When was the lighthouse built?")], k=3)
    n = next(s.rank for s in prep.packed.used if s.passage.path.endswith("lighthouse.md"))
    other = next(s.rank for s in prep.packed.used if s.rank != n)
    answer = (f"The lighthouse was built in 1871 by Maren Holt [{n}]. "
              f"It is made of cheese [{other}]. See also [9].")  # fmt: skip
    assert set(claims_by_number(answer)) == {n, other, 9}
    done = rag.finish(prep, answer, GenerationStats())
    by_n = {c.n: c for c in done.citations}
    good = by_n[n]
    assert good.verified and good.quote in (docs / "lighthouse.md").read_text()
    assert "built in 1871 by Maren Holt" in good.quote
    assert not by_n[other].verified and "does not contain" in by_n[other].reason
    assert not by_n[9].verified and "not given" in by_n[9].reason
    assert "Sources:" in done.text and "NOT VERIFIED" in done.text and done.answer == answer
    # the file changes after indexing: the same citation is no longer shown as verified
    (docs / "lighthouse.md").write_text("# Brightwater\n\nDemolished in 2001.\n")
    again = cite(answer, prep.packed.used, index.read)
    stale = next(c for c in again if c.n == n)
    assert not stale.verified and "changed" in stale.reason


def test_each_sentence_of_a_claim_is_checked_on_its_own(index, engine):
    """Two answer sentences backed by two passage sentences verify, cited once or twice or not
    at all (attributed); one unsupported sentence among them does not."""
    rag = Answerer(index, engine)
    prep = rag.prepare([Message("user", "How do I grow tomatoes?")], k=3)
    n = next(s.rank for s in prep.packed.used if s.passage.path.endswith("garden.txt"))
    sun, water = (
        "Tomatoes need six hours of direct sun each day.",
        "Water them deeply twice a week.",
    )
    for answer in (f"{sun[:-1]} [{n}]. {water[:-1]} [{n}].", f"{sun} {water} [{n}]",
                   f"{sun} {water}"):  # fmt: skip
        (c,) = rag.finish(prep, answer, GenerationStats()).citations
        assert c.verified and c.n == n, (answer, c)
    both = rag.finish(prep, f"{sun} [{n}] {water} [{n}]", GenerationStats()).citations[0]
    assert sun in both.quote and water in both.quote  # each claim's own supporting sentence
    # uncited, two sentences of one passage: each matched well, so attributed and verified
    # (judged as one joined claim, no single sentence held 0.6 of both sentences' words)
    facts = "The Brightwater lighthouse was built in 1871 by Maren Holt. Its lamp can be seen " \
            "from 22 nautical miles away."  # fmt: skip
    (c,) = rag.finish(prep, facts, GenerationStats()).citations
    assert c.inferred and c.verified and c.path.endswith("lighthouse.md"), c
    bad = f"{sun[:-1]} [{n}]. Tomatoes grow best on the moon [{n}]."
    (c,) = rag.finish(prep, bad, GenerationStats()).citations
    assert not c.verified and "does not contain" in c.reason


def test_a_marker_after_the_full_stop_cites_the_sentence_before():
    # models often write "… in 1871. [1]"; the marker must not start an empty claim
    claims = claims_by_number("It was built in 1871. [1] Its lamp is bright [2]. [3]")
    assert claims == {
        1: "It was built in 1871.",
        2: "Its lamp is bright .",
        3: "Its lamp is bright .",
    }


def test_the_example_answer_cites_the_way_the_checker_reads():
    # the one-shot example is what the model imitates: each of its claims must carry a marker
    # the checker parses, pointing at an example source that supports it
    claims = claims_by_number(EXAMPLE_ANSWER)
    assert set(claims) == set(EXAMPLE_SOURCES)
    for n, claim in claims.items():
        assert best_support(EXAMPLE_SOURCES[n][1], claim)[1] >= SUPPORT


def test_uncited_answer_is_attributed_only_when_it_matches(index, engine):
    rag = Answerer(index, engine)
    prep = rag.prepare([Message("user", "How much sun do tomatoes need?")], k=3)
    done = rag.finish(prep, "Tomatoes need six hours of direct sun each day.", GenerationStats())
    assert [c.inferred and c.verified for c in done.citations] == [True]
    none = rag.finish(prep, "Purple elephants dance at noon.", GenerationStats())
    assert none.citations == [] and "cites none" in sources_text([], prep)


def test_no_question_or_no_documents(home, embedder, engine):
    empty = Index.open(load_settings(home), embedder=embedder)
    with pytest.raises(NoQuestion, match="no documents"):
        Answerer(empty, engine).prepare([Message("user", "anything?")])
    with pytest.raises(NoQuestion, match="no question"):
        Answerer(empty, engine).prepare([Message("user", "  ")])
    empty.close()


def shows_the_example(messages: list[Message]) -> bool:
    return [m.role for m in messages[:3]] == ["system", "user", "assistant"] and (
        EXAMPLE_QUESTION in messages[1].content and messages[2].content == EXAMPLE_ANSWER
    )


@pytest.mark.slow
def test_the_layout_is_the_loaded_models(index, engine, home, models_dir):
    """Each model gets the layout its catalog entry names (Qwen: the one-shot example; SmolLM2,
    which copies the example: the system message); the same GGUF loaded from its path has no
    entry and gets the default; a layout given to the Answerer or the question wins."""
    from localai.catalog import Catalog
    from localai.runtime import model_layout, open_engine

    q = [Message("user", "When was the lighthouse built?")]
    small = Answerer(index, engine, model_layout(engine.name))
    assert small.layout is LAYOUTS["system"] and not shows_the_example(small.prepare(q).messages)

    qwen = "qwen2.5-coder-0.5b"  # the smallest catalog model whose entry says "oneshot"
    path = Catalog(models_dir).ensure(qwen, log=lambda m: print(m, file=sys.stderr))
    settings = load_settings(home, context_length=2048, threads=2)
    named = open_engine(settings, qwen, log=lambda m: None)
    try:
        rag = Answerer(index, named, model_layout(named.name))
        assert rag.layout is LAYOUTS["oneshot"]
        msgs = rag.prepare(q, k=3).messages
        assert shows_the_example(msgs) and msgs[-1].content.startswith("Sources:\n\n[")
        assert msgs[-1].content.count("lighthouse.md") == 1  # the real passages: the last turn
        plain = Answerer(index, named, LAYOUTS["system"]).prepare(q, k=3).messages
        assert not shows_the_example(plain) and "lighthouse.md" in plain[0].content
        once = rag.prepare(q, k=3, layout=LAYOUTS["system"]).messages  # this question only
        assert [m.content for m in once] == [m.content for m in plain]
        assert shows_the_example(rag.prepare(q, k=3).messages)
    finally:
        named.close()
    bare = open_engine(settings, str(path), log=lambda m: None)  # how `--model FILE.gguf` loads
    try:
        assert bare.name == str(path) and model_layout(bare.name) is DEFAULT_LAYOUT
    finally:
        bare.close()


def test_rerank_returns_a_permutation_with_judged_passages_first(engine):
    from localai.rag.rerank import judge, rerank

    passages = ["Bananas are yellow fruit.", "The Eiffel Tower is in Paris, France."]
    order = rerank(engine, "In which city is the Eiffel Tower?", passages)
    assert sorted(order) == [0, 1]
    verdicts = [judge(engine, "In which city is the Eiffel Tower?", p) for p in passages]
    assert order == sorted(range(2), key=lambda i: (not verdicts[i], i))


def test_trim_keeps_the_best_sentences_around_the_hit(engine):
    from localai.rag.trim import best_span

    def count(text: str) -> int:
        return len(engine.tokenize(text, special=False))

    hit, after = "Green tea is steeped at 80 °C for two minutes.", "Rinse the pot."
    text = f"Intro.\nThe kettle boils water.\n{hit}\n{after}\nBikes need oil every month."
    question = "At what temperature is green tea steeped?"

    def cut(budget: int, read=()) -> str:
        a, b = best_span(text, question, budget, count, read)
        return text[a:b]

    assert cut(count(hit) + count(after)) == f"{hit}\n{after}"
    assert cut(1) == hit  # never cut inside the best sentence
    assert cut(10_000) == text
    # a span read before that holds the best sentence and fits is read again (its KV is kept)
    before = (text.index("The kettle"), text.index(hit) + len(hit))
    budget = count(text[before[0] : before[1]])
    assert cut(budget, [before]) == text[before[0] : before[1]]
    assert cut(budget - 1, [before]) != text[before[0] : before[1]]  # too long now
    elsewhere = (0, text.index(hit) - 1)  # does not hold the best sentence
    assert cut(budget, [elsewhere]) == cut(budget)


def test_the_spans_read_are_remembered_across_processes(tmp_path, engine):
    import stat

    from localai.index.readback import Passage
    from localai.rag.retrieve import Source
    from localai.rag.trim import Spans, trim

    names = [f"zorb{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(40)]
    text = "Intro line here.\n" + "\n".join(f"The {n} sits on a shelf." for n in names)
    src = Source(1, None, Passage(text, True, "", "/d/facts.md", 1, 41))

    def count(t: str) -> int:
        return len(engine.tokenize(t, special=False))

    path = tmp_path / "kv" / "spans.json"
    first = trim([src], f"Where is the {names[20]}?", 32, count, Spans(path))[0].passage.text
    assert names[20] in first and len(first) < len(text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a new process, a question whose closest sentence lies inside that span: the same span
    near = first.splitlines()[-1].split()[1]  # the span's last name
    assert near != names[20]
    again = trim([src], f"Where is the {near}?", 32, count, Spans(path))
    assert again[0].passage.text == first
    fresh = trim([src], f"Where is the {near}?", 32, count)  # without the memory
    assert fresh[0].passage.text != first


def test_trimmed_passages_still_cite_the_file(index, engine, docs):
    """The model reads the best sentence of each passage; its citation is checked against the
    whole passage in the file, as before."""
    rag = Answerer(index, engine, passage_tokens=16)
    prep = rag.prepare([Message("user", "When was the lighthouse built?")], k=3)
    src = next(s for s in prep.packed.used if s.passage.path.endswith("lighthouse.md"))
    assert src.passage.text == "The Brightwater lighthouse was built in 1871 by Maren Holt."
    done = rag.finish(prep, f"It was built in 1871 by Maren Holt [{src.rank}].", GenerationStats())
    assert [c.verified for c in done.citations] == [True]
