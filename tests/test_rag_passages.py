"""Passages' KV kept and reused (engine/pieces.py): a passage computed for one question is put
back, not computed, when a later question (in this process or the next) retrieves it, at its
new position; the files are private and the folder bounded. Real SmolLM2 GGUF, real sqlite
index, real MiniLM."""

from __future__ import annotations

import stat

import pytest
from conftest import docs_index

from localai.config import load_settings
from localai.engine import Done, SamplingParams
from localai.engine.llamacpp import LlamaCppEngine
from localai.engine.pieces import MIN_TOKENS, Pieces
from localai.engine.prefix import DiskStore
from localai.rag.answer import Answerer, ask
from localai.rag.prompt import LAYOUTS
from localai.runtime import keep_prefixes_on_disk

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, seed=1)
DOCS = {
    "lighthouse.md": "# Brightwater\n\nThe Brightwater lighthouse was built in 1871 by Maren "
    "Holt.\nIts lamp can be seen from 22 nautical miles away, and its keeper rang a bell in "
    "the fog every two minutes.\n",
    "garden.txt": "Tomatoes need six hours of direct sun each day.\nWater them deeply twice a "
    "week, and tie the stems to a cane once the first fruit sets.\n",
}
Q1, Q2 = "When was the lighthouse built?", "How much sun do tomatoes need?"


@pytest.fixture(scope="module")
def index(tmp_path_factory, models_dir, embedder):
    ix = docs_index(tmp_path_factory.mktemp("passages"), models_dir, embedder, DOCS)
    yield ix
    ix.close()


def fresh(model_path, home, kv: str = "f16", reuse: str = "moved") -> LlamaCppEngine:
    """A newly loaded engine with its folders: what a new `localai ask` process starts with."""
    engine = LlamaCppEngine(model_path, "smollm2-135m", context_length=1024, threads=2,
                            type_k=kv, type_v=kv)  # fmt: skip
    keep_prefixes_on_disk(engine, load_settings(home, passage_kv_reuse=reuse))
    return engine


def answer(rag: Answerer, question: str) -> tuple[Done, list]:
    events = list(ask(rag, question, GREEDY, k=2))
    return events[-1], events[0].sources["passages"]


def test_a_passage_read_before_is_put_back_not_computed(index, model_path, tmp_path):
    home = tmp_path / "home"
    engine = fresh(model_path, home)
    try:
        rag = Answerer(index, engine, LAYOUTS["system"])
        first, given = answer(rag, Q1)
        s = first.stats
        assert len(given) == 2 and s.extra["cached_from"]["passages"] == 0
        assert s.extra["prefill_tokens"] == s.prompt_tokens  # everything computed once
        runs = list(engine.pieces.known)  # a run of tokens per passage, as the prompt has them
        assert len(runs) == 2 and all(len(r) >= MIN_TOKENS for r in runs)
        text = engine.detokenize([t for r in runs for t in r])
        assert "1871" in text and "six hours" in text
    finally:
        engine.close()
    files = list((home / "kv" / "passages").glob("*.kv"))
    assert len(files) == 2  # one per passage
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700

    engine = fresh(model_path, home)  # a new process: head and passages come from the files
    try:
        rag = Answerer(index, engine, LAYOUTS["system"])
        again, _ = answer(rag, Q1)
        s = again.stats
        assert s.extra["prefix_source"] == "disk"
        assert s.extra["cached_from"]["passages"] == sum(len(r) for r in runs)
        assert s.extra["prefill_tokens"] == s.prompt_tokens - s.cached_tokens
        assert s.extra["prefill_tokens"] < s.prompt_tokens - sum(len(r) for r in runs) + 1
        assert again.answer == first.answer  # same positions, same KV: the same answer
        # the other question ranks the passages the other way round: both move, none computed
        other, given2 = answer(rag, Q2)
        assert [p["path"] for p in given2] == [p["path"] for p in given][::-1]
        assert other.stats.extra["cached_from"]["passages"] == sum(len(r) for r in runs)
        engine.pieces.clear()  # the same question computed whole: the model still reads it
        engine.forget()
        whole, _ = answer(Answerer(index, engine, LAYOUTS["system"], keep_passages=False), Q2)
        assert whole.stats.extra["cached_from"]["passages"] == 0
        assert ("six" in whole.answer.lower()) == ("six" in other.answer.lower())
    finally:
        engine.close()


def test_runs_are_found_where_the_prompt_holds_them_and_never_overlap(tmp_path):
    pieces = Pieces()
    run_a, run_b = list(range(100, 120)), list(range(200, 230))
    pieces.register([run_a, run_b, [1, 2, 3]])  # too short to be worth keeping
    assert len(pieces.known) == 2
    tokens = [7] * 5 + run_b + [9] + run_a + [8]
    assert pieces.find(tokens, 0) == []  # no store: nothing is looked for
    pieces.disk = DiskStore(tmp_path, "m", {"model": "a"}, max_files=100, max_bytes=10**6)
    assert pieces.find(tokens, 0) == [(5, 35), (36, 56)]
    assert pieces.find(tokens, 6) == [(36, 56)]  # only after the start
    assert pieces.find(run_a[:-1] + [0], 0) == []  # only whole runs
    pieces.save(tokens, 36, 56, b"kv")
    assert pieces.load(tokens, 36, 56) == (36, b"kv") and pieces.load(tokens, 5, 35) is None
    moved = [6] + run_a + run_b
    assert pieces.load(moved, 1, 21) == (36, b"kv")  # the same run anywhere
    pieces.exact = True  # only after the same tokens
    assert pieces.load(moved, 1, 21) is None and pieces.load(tokens, 36, 56) is None
    pieces.save(tokens, 36, 56, b"kv2")
    assert pieces.load(tokens, 36, 56) == (36, b"kv2")


def test_the_passage_folder_keeps_the_most_recently_used_within_its_bytes(tmp_path):
    import os

    store = DiskStore(tmp_path, "m", {"model": "a"}, max_files=100, max_bytes=2500)
    runs = [[i] * 20 for i in range(4)]
    for age, run in enumerate(runs):
        p = store.save(run, b"x" * 1000)
        os.utime(p, (1000 + age, 1000 + age))  # saved in order, a second apart
    kept = [store.load(run) is not None for run in runs]
    assert kept == [False, False, True, True]
    assert store.usage()["bytes"] <= 2500


def test_a_quantized_cache_moves_its_passages_too(index, model_path, tmp_path):
    """8-bit K and V (llama.cpp's flash-attention path): the keys moved to a new position are
    rotated from their stored quantized form."""
    engine = fresh(model_path, tmp_path / "home", kv="q8_0")
    try:
        rag = Answerer(index, engine, LAYOUTS["system"])
        answer(rag, Q1)
        engine.forget()
        moved, _ = answer(rag, Q2)
        assert moved.stats.extra["cached_from"]["passages"] >= 2 * MIN_TOKENS
        assert moved.answer.strip()
        assert engine.info()["passage_kv"]["files"] == 2
    finally:
        engine.close()


def test_no_passage_kv_is_kept_when_its_budget_is_zero(model_path, tmp_path):
    engine = LlamaCppEngine(model_path, "smollm2-135m", context_length=512, threads=1)
    try:
        keep_prefixes_on_disk(engine, load_settings(tmp_path / "home", passage_kv_bytes=0))
        assert engine.prefixes.disk is not None and engine.pieces.disk is None
        assert engine.info()["passage_kv"] == {}
    finally:
        engine.close()


def test_exact_reuse_puts_a_passage_back_only_after_the_same_tokens(index, model_path, tmp_path):
    engine = fresh(model_path, tmp_path / "home", reuse="exact")
    try:
        assert load_settings(tmp_path / "home").passage_kv_reuse == "exact"  # the default
        rag = Answerer(index, engine, LAYOUTS["system"])
        first, _ = answer(rag, Q1)
        engine.prefixes.clear()  # as a new process
        engine.pieces.clear()
        engine.forget()
        again, _ = answer(rag, Q1)
        assert again.stats.extra["cached_from"]["passages"] >= 2 * MIN_TOKENS
        assert again.answer == first.answer
        engine.forget()  # the passages in the other order: not where they were computed
        other, _ = answer(rag, Q2)
        assert other.stats.extra["cached_from"]["passages"] == 0
    finally:
        engine.close()
