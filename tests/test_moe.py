"""Mixture-of-experts architectures in the torch runner, against llama.cpp on the same tiny GGUFs
(moe_gguf.py: random weights in Q4_K/Q6_K/Q8_0/F16/F32, the test model's tokenizer)."""

import json
import os
from pathlib import Path
from pydoc_data.topics import topics

import llama_cpp
import numpy as np
import pytest
import torch
from conftest import localai
from moe_gguf import ARCHS, build

from localai.config import EXPERT_POLICIES
from localai.engine import Done, Message, SamplingParams, chat
from localai.engine.torch import TorchEngine
from localai.engine.torch.experts import parse_budget
from localai.engine.torch.fit import RUNTIME_BYTES, read_shape, resident_bytes
from localai.engine.torch.routing import POLICIES, curve, read_trace, replay

N = 512
TEXT = "\n\n".join(topics[k] for k in sorted(topics))[:20000]


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory, model_path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe")
    return {a: build(d / f"{a}.gguf", a, model_path) for a in ARCHS}


def llama_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N, n_batch=N, logits_all=True,
                          n_threads=1, verbose=False)  # fmt: skip
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        llm.close()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_moe_logits_match_llama_cpp(arch, moe_files):
    """Perplexity within 1% of llama.cpp's and top-1 agreement at the dense tests' level (95%),
    over 511 positions; one-token steps pick the same tokens as the prompt pass where it has a
    clear best token.

    Measured: perplexity ratio 0.998-1.000, top-1 agreement 96.1% (llama: Mixtral-style, the
    smallest top-2 margins) to 98.0% (olmoe), mean |logit difference| ~0.02."""
    eng = TorchEngine(moe_files[arch], context_length=N, threads=1)
    try:
        assert eng.info()["arch"] == arch and eng.model.hp.is_moe
        tokens = eng.tokenize(TEXT, special=False)[:N]
        ref = llama_logits(moe_files[arch], tokens)[:-1]  # N-1, V
        model = eng.model
        model.cache.reset()
        ours = torch.cat([model.forward(torch.tensor(tokens[i : i + 128]), True)
                          for i in range(0, N, 128)])[:-1]  # fmt: skip
        tgt = torch.tensor(tokens[1:])[:, None]
        nll_ref = -float(torch.log_softmax(ref, -1).gather(1, tgt).mean())
        nll_ours = -float(torch.log_softmax(ours, -1).gather(1, tgt).mean())
        assert abs(np.exp(nll_ours - nll_ref) - 1) < 0.01, (nll_ours, nll_ref)
        agree = float((ref.argmax(-1) == ours.argmax(-1)).float().mean())
        assert agree >= 0.95, agree

        model.cache.reset()  # the same positions one token at a time
        model.forward(torch.tensor(tokens[:32]))
        steps = torch.cat([model.forward(torch.tensor(tokens[i : i + 1]), True)
                           for i in range(32, 64)])  # fmt: skip
        # a step runs ggml's matrix-vector kernel, a prompt its batched GEMM (as llama.cpp's own
        # decode and prompt do): the same integer products summed in another order, so the two
        # pick the same token wherever the prompt pass has a clear best one
        top2 = ours[32:64].topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1
        assert clear.sum() >= 16, clear  # most positions (Mixtral-style: 23 of 32)
        assert torch.equal(steps.argmax(-1)[clear], ours[32:64].argmax(-1)[clear])
        assert float((steps - ours[32:64]).abs().max()) < 0.5
    finally:
        eng.close()


def test_moe_chat_streams_through_the_engine(moe_files):
    """A MoE GGUF runs through the Engine protocol: greedy chat, the same tokens as llama.cpp's
    tokenizer, the experts counted in the weight bytes."""
    path = moe_files["qwen3moe"]
    eng = TorchEngine(path, context_length=N, threads=1)
    try:
        hp = eng.model.hp
        expert_bytes = sum(b.ffn.experts.nbytes for b in eng.model.blocks)
        assert hp.n_experts == 8 and hp.n_experts_used == 2
        assert eng.info()["weights_bytes"] > expert_bytes > 0
        params = SamplingParams(max_tokens=8, temperature=0.0)
        events = list(chat(eng, [Message("user", "Hello")], params))
        done = events[-1]
        assert isinstance(done, Done) and done.stats.completion_tokens == 8
        assert eng.info()["experts"] == 8 and eng.info()["experts_used"] == 2
    finally:
        eng.close()


@pytest.mark.parametrize("arch", ["qwen2moe", "llama"])
def test_every_expert_budget_computes_the_all_resident_result(arch, moe_files):
    """Experts read on demand into 10%, 25%, 50% or 100% of their bytes give logits identical to
    the all-resident run, prompt and greedy steps alike (the same bytes, the same kernels); the
    cache stays within its budget and reads each expert once when everything fits."""
    eng = TorchEngine(moe_files[arch], context_length=N, threads=1)
    prompt = eng.tokenize(TEXT, special=False)[:48]
    eng.close()

    def run(budget, prefetch=False):
        eng = TorchEngine(moe_files[arch], context_length=N, threads=1, expert_budget=budget,
                          expert_prefetch=prefetch)  # fmt: skip
        try:
            model = eng.model
            out = [model.forward(torch.tensor(prompt), True)]  # 48, V
            for _ in range(16):
                out.append(model.forward(out[-1][-1:].argmax(-1), True))  # 1, V
            return torch.cat(out), eng.info()["expert_cache"]
        finally:
            eng.close()

    ref, none = run(None)
    assert none is None
    n_experts = 2 * 8  # layers × experts in moe_gguf's defaults
    for budget in ("10%", "25%", "50%", "100%"):
        out, cache = run(budget)
        assert torch.equal(out, ref), budget
        assert 0 < cache["used_bytes"] <= cache["budget_bytes"] and cache["bytes_read"] > 0
        if budget == "10%":
            assert cache["evictions"] > 0 and cache["misses"] > n_experts
        if budget == "100%":
            assert cache["evictions"] == 0 and cache["misses"] <= n_experts
        assert cache["prefetched"] == cache["predicted"] == 0  # reading ahead is off by default
        if budget in ("10%", "25%"):  # it changes when experts arrive, not what they compute
            out, cache = run(budget, prefetch=True)
            assert torch.equal(out, ref), budget
            # 16 one-token steps, a guess of top-2 for layer 1 from layer 0's input in each
            assert cache["prefetched"] > 0 and cache["predicted"] == 16 * 2


def test_expert_budget_is_bytes_or_a_share():
    assert parse_budget(None, 1000) is None and parse_budget("40%", 1000) == 400
    assert parse_budget(0.25, 1000) == 250 and parse_budget(5000, 1000) == 5000
    assert parse_budget("2G", 1) == 2 << 30 and parse_budget("512MiB", 1) == 512 << 20
    assert parse_budget("1.5gb", 1) == 3 << 29 and parse_budget("4096", 1) == 4096
    for bad in ("150%", "0%", "lots", "G"):
        with pytest.raises(ValueError, match="expert budget"):
            parse_budget(bad, 1000)


def test_a_request_reports_its_expert_traffic(moe_files):
    eng = TorchEngine(moe_files["qwen2moe"], context_length=N, threads=1, expert_budget="25%",
                      expert_prefetch=True)  # fmt: skip
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0)
        done = list(chat(eng, [Message("user", "Hello there")], params))[-1]
        stats = done.stats.as_dict()
        assert 0 <= stats["expert_hit_rate"] < 1 and stats["expert_bytes_read"] > 0
        assert "extra" not in stats and stats["completion_tokens"] == 6
        # the next layer's experts guessed a layer early, scored against where it routed
        assert 0 <= stats["prefetch_precision"] <= 1 and 0 <= stats["prefetch_recall"] <= 1
    finally:
        eng.close()


def test_run_a_moe_gguf_at_a_budget_streams_the_all_resident_text(moe_files, home):
    """`localai run --engine torch --model X.gguf --expert-budget 40% --json`: the same text as
    with every expert resident, and the expert traffic in the stats; llama.cpp refuses a budget
    with a one-line reason."""
    base = ("run", "Name a colour.", "--model", str(moe_files["olmoe"]), "--engine", "torch",
            "-t", "0", "--max-tokens", "8", "--ctx", "512", "--json", "--no-daemon")  # fmt: skip
    full = localai(*base)
    part = localai(*base, "--expert-budget", "40%")
    assert full.returncode == 0 and part.returncode == 0, (full.stderr, part.stderr)
    full, part = json.loads(full.stdout), json.loads(part.stdout)
    assert part["text"] == full["text"] and part["stats"]["completion_tokens"] == 8
    assert "expert_hit_rate" not in full["stats"]
    assert 0 < part["stats"]["expert_hit_rate"] < 1 and part["stats"]["expert_bytes_read"] > 0
    r = localai(*base[:5], "llama", *base[6:], "--expert-budget", "40%")
    assert r.returncode == 1 and "needs --engine torch" in r.stderr and "Traceback" not in r.stderr
    trace = home.parent / "routing.jsonl"  # `moe curve` over a trace `run` recorded
    assert localai(*base, "--trace-routing", str(trace)).returncode == 0
    r = localai("moe", "curve", str(trace), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["total_experts"] == 16 and out["curve"][-1]["lru"] > 0
    r = localai("moe", "curve", str(moe_files["olmoe"]))  # not a trace: one line, no traceback
    assert r.returncode == 1 and "not a routing trace" in r.stderr and "Traceback" not in r.stderr


def test_the_expert_cache_is_held_in_the_ram_budget(moe_files, home):
    """Loaded with a budget, a MoE model's experts count in the governor as the cache's budget,
    not as weights."""
    from localai.config import load_settings
    from localai.governor import Governor
    from localai.runtime import open_engine

    settings = load_settings(home, engine="torch", expert_budget="25%", context_length=512)
    gov = Governor()
    eng = open_engine(settings, str(moe_files["qwen3moe"]), log=lambda m: None, governor=gov)
    try:
        held, info = gov.snapshot()["holders"], eng.info()
        assert held["expert_cache"] == info["expert_cache"]["budget_bytes"] > 0
        assert held["weights"] == info["weights_bytes"] - info["expert_bytes"]
        assert info["expert_cache"]["budget_bytes"] == info["expert_bytes"] // 4
    finally:
        eng.close()


def test_the_expert_budget_not_named_is_what_the_ram_budget_leaves(moe_files, home):
    """With no expert budget, a MoE model whose experts do not fit in what the governor's
    budget leaves after the resident weights, the runtime and the KV cache gets an expert cache
    of exactly that; one whose experts fit keeps them in place; a budget with no room for one
    layer's experts is refused before anything is read."""
    from localai.config import load_settings
    from localai.governor import Governor
    from localai.runtime import open_engine

    path = moe_files["qwen3moe"]
    shape = read_shape(path)
    settings = load_settings(home, engine="torch", context_length=512)
    gov = Governor(resident_bytes(shape) + shape.expert_bytes)  # the KV leaves less than all
    gov.reserve("index", 1 << 16)  # what the daemon's other holders take is not the model's
    eng = open_engine(settings, str(path), log=lambda m: None, governor=gov)
    try:
        info, held = eng.info(), gov.snapshot()["holders"]
        kv = info["kv_bytes_allocated"]
        assert info["expert_cache"]["budget_bytes"] == shape.expert_bytes - kv - (1 << 16)
        assert held["expert_cache"] == info["expert_cache"]["budget_bytes"]
    finally:
        eng.close()
    gov = Governor(resident_bytes(shape) + shape.expert_bytes + (64 << 20))
    eng = open_engine(settings, str(path), log=lambda m: None, governor=gov)
    try:
        assert eng.info()["expert_cache"] is None  # all in place in the memory map
    finally:
        eng.close()
    with pytest.raises(Exception, match="leaves 0 MiB for experts after the weights"):
        open_engine(settings, str(path), log=lambda m: None,
                    governor=Governor(resident_bytes(shape) + kv + 4096))  # fmt: skip


def test_memory_pressure_shrinks_the_expert_cache_to_its_floor(moe_files, home):
    """The daemon's model registers its expert cache as the governor's "experts" stage: under
    pressure it drops to one token's experts per layer (and the model stays loaded when that
    was enough), the ledger keeps the lower budget, and the next answer is the same text."""
    from localai.config import load_settings
    from localai.governor import Governor
    from localai.keepalive import ResidentEngine
    from localai.runtime import engine_loader

    settings = load_settings(home, engine="torch", expert_budget="100%", context_length=512)
    gov = Governor()
    model = ResidentEngine(engine_loader(settings, str(moe_files["olmoe"]), log=lambda m: None),
                           None, gov, log=lambda m: None)  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0.0)
    try:
        first = list(chat(model, [Message("user", "Hello")], params))[-1].text
        held = gov.snapshot()["holders"]["expert_cache"]
        event = gov.shrink(1, "test", log=lambda m: None)
        assert event["freed"]["expert_cache"] > 0 and model.loaded
        budget = model.info()["expert_cache"]["budget_bytes"]
        assert budget == held // 4  # top-2 of 8 experts in each layer
        assert gov.snapshot()["holders"]["expert_cache"] == budget
        assert list(chat(model, [Message("user", "Hello")], params))[-1].text == first
    finally:
        model.close()


@pytest.mark.parametrize("policy", ["freq", "lru"])
def test_replaying_a_routing_trace_predicts_the_live_cache(moe_files, tmp_path, policy):
    """A trace recorded while the cache served at 25% under a policy (no reading ahead, which
    a replay does not model) replays through the same policy at the same size to the live hits
    and misses exactly; LRU's curve rises with the size and at 100% misses each expert once."""
    trace = tmp_path / "routing.jsonl"
    eng = TorchEngine(moe_files["olmoe"], context_length=N, threads=1, expert_budget="25%",
                      trace_routing=trace, expert_policy=policy)  # fmt: skip
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0)
        list(chat(eng, [Message("user", "Write about the sea.")], params))
        live, info = eng.model.expert_cache.stats, eng.info()
    finally:
        eng.close()
    assert info["expert_cache"]["policy"] == policy
    header, lookups = read_trace(trace)
    assert header["layers"] == 2 and header["experts"] == 8 and len(lookups) > 0
    capacity = info["expert_cache"]["budget_bytes"] // header["expert_bytes"]
    again = replay(lookups, capacity, policy)
    assert (again["hits"], again["misses"]) == (live.hits, live.misses)
    rows = curve(trace)["curve"]
    rates = [r["lru"] for r in rows]
    assert rates == sorted(rates) and all(0 <= r["lfu"] <= 1 for r in rows)
    assert replay(lookups, 16, "lru")["misses"] == len(set(lookups))


def test_counts_that_outlive_eviction_keep_the_hot_experts_of_a_cycle_too_long_to_hold():
    """Each token reads the same layers' experts in the same order: a cache smaller than one
    token's set evicts every expert just before its next use under LRU and in-cache counts (no
    hit at all), while "freq" keeps the most used and hits on them."""
    hot = [(layer, 0) for layer in range(8)]  # every token: expert 0 of each layer, then others
    lookups = []
    for t in range(50):
        lookups += hot + [(layer, 1 + (t + layer) % 7) for layer in range(8)]
    for policy in ("lru", "lfu", "decay"):
        assert replay(lookups, 8, policy)["hits"] == 0
    kept = replay(lookups, 8, "freq")
    assert kept["hits"] == 49 * 8 and kept["hits"] + kept["misses"] == len(lookups)
    assert EXPERT_POLICIES == POLICIES  # the settings name the policies replay knows


def test_status_and_the_memory_pane_show_the_expert_cache(moe_files, models_dir, tmp_path):
    """A daemon serving a MoE model at a budget reports its expert cache in /localai/status;
    `localai status` and the TUI's memory pane show it."""
    from daemon_helpers import start_daemon
    from localai_tui.widgets import memory_text

    home = tmp_path / "home"
    flags = ("--engine", "torch", "--expert-budget", "50%", "--expert-prefetch", "--ctx", "512")
    with start_daemon(home, models_dir, str(moe_files["qwen3moe"]), *flags) as d:
        body = {"model": d.model, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4, "stats": True}  # fmt: skip
        status, out = d.request("POST", "/v1/chat/completions", body)
        assert status == 200 and out["stats"]["expert_bytes_read"] > 0  # per answer, over HTTP
        assert 0 <= out["stats"]["prefetch_recall"] <= 1
        status, info = d.request("GET", "/localai/status")
        assert status == 200 and info["memory"]["holders"]["expert_cache"] > 0
        ex = info["experts"]
        assert 0 < ex["used_bytes"] <= ex["budget_bytes"] and ex["misses"] > 0
        assert "expert cache" in memory_text(info, None, {})
        env = dict(os.environ, LOCALAI_HOME=str(home), LOCALAI_PORT=str(d.port))
        r = localai("status", env=env)
        assert r.returncode == 0 and "experts     cache" in r.stdout, r.stdout + r.stderr


def test_fit_forecasts_from_the_header_and_a_probe_measured_once(moe_files, home):
    """`localai fit X.gguf --json`: the sizes from the header alone (experts: the `_exps`
    tensors), the cache a budget gives, a band around the forecast, and the two rates measured
    once, then read back from the data dir."""
    path = moe_files["olmoe"]
    r = localai("fit", str(path), "--budget", "50%", "--json")
    assert r.returncode == 0, r.stderr
    out, shape = json.loads(r.stdout), read_shape(path)
    assert out["runs"] and out["expert_bytes"] == shape.expert_bytes > 0
    assert out["file_bytes"] == shape.total_bytes
    # resident: the dense weights a step reads and the runtime, not the embedding table that
    # sits beside the separate head (its rows come from the memory map)
    embedding = shape.total_bytes - shape.expert_bytes - shape.active_dense_bytes
    assert embedding > 0 and out["resident_bytes"] == shape.active_dense_bytes + RUNTIME_BYTES
    assert abs(out["hit_rate_uniform"] - 0.5) < 1e-3
    assert out["tokens_per_s_low"] <= out["tokens_per_s"] <= out["tokens_per_s_high"]
    assert out["disk_bytes_per_s"] > 0 and out["matvec_bytes_per_s"] > 0
    again = json.loads(localai("fit", str(path), "--json").stdout)
    assert again["matvec_bytes_per_s"] == out["matvec_bytes_per_s"]  # the probe, cached
    assert again["expert_cache_bytes"] == shape.expert_bytes  # all fit in the RAM budget
