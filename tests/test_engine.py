"""The llama.cpp backend against the Engine contract, on the real SmolLM2-135M model."""

import threading

import pytest

from localai.engine import (
    ContextOverflowError,
    Delta,
    Done,
    Engine,
    EngineError,
    Message,
    SamplingParams,
    chat,
)

GREEDY = dict(temperature=0.0, max_tokens=24)
QUESTION = [Message("user", "Name three colours of the rainbow.")]


def run(engine, params, messages=QUESTION, cancel=None):
    events = list(chat(engine, messages, params, cancel))
    deltas = [e.text for e in events if isinstance(e, Delta)]
    done = events[-1]
    assert isinstance(done, Done) and all(isinstance(e, Delta) for e in events[:-1])
    return deltas, done


def test_implements_the_engine_protocol(engine):
    assert isinstance(engine, Engine)
    info = engine.info()
    assert info["backend"] == "llama" and info["context_length"] == 2048
    assert info["kv_bytes_allocated"] > 0 and info["weights_bytes"] > 50e6


def test_chat_template_comes_from_the_model(engine):
    prompt = engine.apply_chat_template([Message("system", "S"), Message("user", "U")])
    assert "<|im_start|>system\nS<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    (im_start,) = engine.tokenize("<|im_start|>")
    assert engine.tokenize(prompt).count(im_start) == 3  # control tokens parsed, not spelled out


def test_greedy_is_deterministic_and_deltas_join(engine):
    d1, done1 = run(engine, SamplingParams(**GREEDY))
    d2, done2 = run(engine, SamplingParams(**GREEDY))
    assert done1.text == done2.text and done1.text.strip()
    assert "".join(d1) == done1.text
    st = done1.stats
    assert st.prompt_tokens == len(engine.tokenize(engine.apply_chat_template(QUESTION)))
    assert 0 < st.completion_tokens <= 24 and st.finish_reason in ("stop", "length")
    assert st.ttft_s > 0 and st.tokens_per_s > 0 and st.kv_bytes > 0 and st.peak_rss_bytes > 0


def test_seed_makes_sampling_repeatable(engine):
    p = dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24)
    a = run(engine, SamplingParams(seed=7, **p))[1].text
    b = run(engine, SamplingParams(seed=7, **p))[1].text
    others = {run(engine, SamplingParams(seed=s, **p))[1].text for s in (8, 9, 10)}
    assert a == b
    assert others != {a}  # different seeds explore different text


def test_max_tokens_gives_length(engine):
    _, done = run(engine, SamplingParams(temperature=0.0, max_tokens=3),
                  [Message("user", "Count from one to fifty in words.")])  # fmt: skip
    assert done.stats.completion_tokens == 3 and done.stats.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_returned(engine):
    msgs = [Message("user", "Count from 1 to 20, separated by commas.")]
    full = run(engine, SamplingParams(temperature=0.0, max_tokens=60), msgs)[1].text
    assert "5" in full, full
    cut = full.index("5")
    deltas, done = run(engine, SamplingParams(temperature=0.0, max_tokens=60, stop=["5"]), msgs)
    assert done.text == full[:cut] == "".join(deltas)
    assert done.stats.finish_reason == "stop"


def test_context_overflow_is_refused_with_counts(engine):
    long = [Message("user", "word " * 3000)]
    with pytest.raises(ContextOverflowError) as e:
        run(engine, SamplingParams(max_tokens=10), long)
    assert e.value.prompt_tokens > 2048 and e.value.context_length == 2048
    assert "2,048" in str(e.value)
    fits_alone = [Message("user", "word " * 1900)]
    with pytest.raises(ContextOverflowError, match="max_tokens is 500"):
        run(engine, SamplingParams(max_tokens=500), fits_alone)


def test_cancel_stops_and_frees_the_engine(engine):
    cancel = threading.Event()
    msgs = [Message("user", "Write a long story about a lighthouse.")]
    gen = chat(engine, msgs, SamplingParams(temperature=0.0, max_tokens=200), cancel)
    n = 0
    for ev in gen:
        if isinstance(ev, Delta):
            n += 1
            if n == 3:
                cancel.set()
        else:
            assert ev.stats.finish_reason == "cancelled"
            assert ev.stats.completion_tokens < 10
    # closing a stream half-way also frees the engine for the next request
    gen2 = chat(engine, msgs, SamplingParams(temperature=0.0, max_tokens=50))
    next(gen2)
    with pytest.raises(EngineError, match="already generating"):
        next(chat(engine, msgs, SamplingParams(max_tokens=5)))
    gen2.close()
    assert run(engine, SamplingParams(**GREEDY))[1].text


def test_bad_sampling_values_are_errors():
    with pytest.raises(EngineError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(EngineError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_quantized_kv_types_are_separate_settings(model_path, engine):
    from localai.engine.llamacpp import LlamaCppEngine

    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims; f16 K and V
    assert engine.kv_bytes_per_token() == 30 * 2 * (3 * 64) * 2

    eng = LlamaCppEngine(
        model_path, "q", context_length=512, threads=2, type_k="q8_0", type_v="q4_0"
    )
    try:
        info = eng.info()
        assert (info["type_k"], info["type_v"]) == ("q8_0", "q4_0")
        ratio = eng.kv_bytes_per_token() / engine.kv_bytes_per_token()
        assert ratio == pytest.approx((34 / 32 + 18 / 32) / 4)  # q8_0 K + q4_0 V vs f16 + f16
        assert info["kv_bytes_allocated"] == int(eng.kv_bytes_per_token() * 512)
        _, done = run(eng, SamplingParams(**GREEDY))
        assert done.text.strip()
    finally:
        eng.close()
