"""The RAG prompt's fixed head (system message, layout example) computed once and kept: in the
engine across requests, a chat in between included, and on disk across processes; answers are
the same (greedy) as with the whole prompt computed, and a changed layout never reuses a file.
Real SmolLM2 GGUF, real sqlite index, real MiniLM."""

from __future__ import annotations

import stat

import pytest
import torch
from conftest import docs_index

from localai.config import load_settings
from localai.engine import Done, Message, SamplingParams, chat
from localai.engine.llamacpp import LlamaCppEngine
from localai.engine.prefix import DiskStore
from localai.rag.answer import Answerer, Found, ask
from localai.rag.prompt import LAYOUTS
from localai.runtime import keep_prefixes_on_disk

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, seed=1)
DOCS = {
    "lighthouse.md": "# Brightwater\n\nThe Brightwater lighthouse was built in 1871 by Maren "
    "Holt.\nIts lamp can be seen from 22 nautical miles away.\n",
    "garden.txt": "Tomatoes need six hours of direct sun each day.\nWater them deeply twice a "
    "week.\n",
}
Q1, Q2 = "When was the lighthouse built?", "How much sun do tomatoes need?"


@pytest.fixture(scope="module")
def index(tmp_path_factory, models_dir, embedder):
    ix = docs_index(tmp_path_factory.mktemp("prefix"), models_dir, embedder, DOCS)
    yield ix
    ix.close()


def fresh(model_path) -> LlamaCppEngine:
    """A newly loaded engine: what a new `localai ask` process starts with."""
    return LlamaCppEngine(model_path, "smollm2-135m", context_length=1024, threads=2)


def answer(rag: Answerer, question: str) -> Done:
    events = list(ask(rag, question, GREEDY, k=2))
    assert isinstance(events[0], Found) and events[0].sources["passages"]  # sources come first
    return events[-1]


def test_the_head_is_computed_once_and_survives_a_chat_in_between(index, model_path):
    engine = fresh(model_path)
    try:
        rag = Answerer(index, engine, LAYOUTS["system"])
        first = answer(rag, Q1)
        head = first.stats.extra["prefix_tokens"]
        assert first.stats.extra["prefix_source"] == "computed" and head > 10
        assert first.stats.cached_tokens == 0 and first.stats.extra["prefill_tokens"] == (
            first.stats.prompt_tokens
        )
        # a plain chat overwrites the live KV; the head's snapshot is kept
        list(chat(engine, [Message("user", "Say hello.")], GREEDY))
        second = answer(rag, Q2)
        s = second.stats
        assert s.extra["prefix_source"] == "memory" and s.cached_tokens >= head
        assert s.extra["cached_from"]["prefix"] == head
        assert s.extra["prefill_tokens"] == s.prompt_tokens - s.cached_tokens
        engine.prefixes.clear()  # the same question with every token computed: the same answer
        engine.forget()
        plain = answer(Answerer(index, engine, LAYOUTS["system"], keep_head=False), Q2)
        assert plain.stats.cached_tokens == 0 and plain.answer == second.answer
    finally:
        engine.close()


def test_the_head_is_kept_on_disk_private_and_per_layout(index, model_path, tmp_path):
    settings = load_settings(tmp_path / "home")
    engine = fresh(model_path)
    try:
        keep_prefixes_on_disk(engine, settings)
        first = answer(Answerer(index, engine, LAYOUTS["system"]), Q1)
    finally:
        engine.close()
    (path,) = (tmp_path / "home" / "kv").glob("*.kv")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    engine = fresh(model_path)  # a new process: the head comes from the file
    try:
        keep_prefixes_on_disk(engine, settings)
        again = answer(Answerer(index, engine, LAYOUTS["system"]), Q1)
        assert again.stats.extra["prefix_source"] == "disk"
        assert again.stats.cached_tokens >= first.stats.extra["prefix_tokens"]
        assert again.answer == first.answer
        # another layout is another head: computed, and kept in a file of its own
        other = answer(Answerer(index, engine, LAYOUTS["oneshot"]), Q1)
        assert other.stats.extra["prefix_source"] == "computed"
        assert len(list(path.parent.glob("*.kv"))) == 2
    finally:
        engine.close()


def test_a_file_of_another_identity_or_damaged_is_never_restored(tmp_path):
    tokens = [1, 2, 3, 4]
    old = DiskStore(tmp_path, "m", {"type_k": "f16", "model": "a"})
    p = old.save(tokens, b"kv")
    assert old.load(tokens) == b"kv" and old.load([1, 2, 3]) is None
    other = DiskStore(tmp_path, "m.v2", {"type_k": "f16", "model": "b"}).save(tokens, b"kv2")
    new = DiskStore(tmp_path, "m", {"type_k": "q8_0", "model": "a"})  # the KV type changed
    assert new.load(tokens) is None
    new.save(tokens, b"other")
    assert not p.exists() and other.exists()  # the same model's stale file, and only it, goes
    q = new.path(tokens)
    q.write_bytes(q.read_bytes()[:10])  # cut short
    assert new.load(tokens) is None and not q.exists()


@pytest.mark.slow  # loads the torch runner (and builds its kernels in a fresh checkout)
@pytest.mark.parametrize("sparse", [False, True])
def test_the_torch_runner_restores_a_kept_prefix_exactly(model_path, sparse):
    """A head long enough to reach the 4-bit pages (window 128 + one K group) comes back from
    its snapshot, after another prompt filled the cache, and the answer is unchanged; with
    sparse attention the pages' summaries (the keys' channel-major copy) come back too."""
    from localai.engine.tokengen import shared_prefix
    from localai.engine.torch import TorchEngine

    eng = TorchEngine(model_path, context_length=1024, threads=2, k_bits=4, v_bits=4,
                      attn_budget=512 if sparse else None)  # fmt: skip
    try:
        head_text = "<|im_start|>system\n" + "Answer briefly and cite your sources. " * 40
        tokens = eng.tokenize(head_text + "<|im_end|>\n<|im_start|>user\nName a colour."
                              "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
        head = tokens[: shared_prefix(eng.tokenize(head_text), tokens)]
        assert len(head) > 256

        def run() -> Done:
            return next(ev for ev in eng.generate(tokens, GREEDY) if isinstance(ev, Done))

        eng.keep_prefix(head)
        eng.forget()
        computed = run()
        assert computed.stats.extra["prefix_source"] == "computed"
        cache = eng.model.cache
        q = cache.qend(len(head))
        copy = cache.kcopy[..., : q // 2].clone()  # the head's quantized keys' copy
        assert copy.numel() == (cache.L * cache.H * cache.D * q // 2 if sparse else 0)
        list(eng.generate(eng.tokenize("Something else entirely. " * 80), GREEDY))  # its pages
        restored = run()
        assert torch.equal(cache.kcopy[..., : q // 2], copy)
        assert restored.stats.extra["prefix_source"] == "memory"
        assert restored.stats.cached_tokens >= len(head)
        assert restored.text == computed.text
        # a prompt that cuts back into the quantized pages: the newest quantized tokens, held in
        # fp16 (and restored with the snapshot), come back; nothing before the cut is computed
        q_old = cache.qend(cache.n)
        cut = cache.ids[: q_old - 10] + eng.tokenize("Name a fruit.")
        assert cache.qend(q_old - 10) < q_old and cache.qend(q_old - 10) >= cache.exact_from
        again = eng.prefill(cut).topk(5)
        assert eng.reused == q_old - 10
        eng.forget()
        ref = eng.prefill(cut).topk(5)
        assert eng.reused == 0 and again.indices[0] == ref.indices[0]
        assert torch.allclose(again.values, ref.values, atol=0.4), (again, ref)
    finally:
        eng.close()
