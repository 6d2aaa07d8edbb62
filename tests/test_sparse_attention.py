"""Sparse decode attention: page selection from per-page key bounds, the native kernels against
their pure-torch references on sparse page lists, and the runner exact below its budget."""

import dataclasses

import pytest
import torch
from conftest import TEST_MODEL
from test_kv_cache import HQ, D, H, fill, kv_data

from localai.engine import Done, Message, SamplingParams, chat
from localai.engine.torch import TorchEngine, attention, native
from localai.engine.torch.kv import PAGE, KVCache, KVConfig


def sparse_case(cfg: KVConfig, n: int, seed: int = 0, needle: int | None = None,
                pages_alike: bool = False, **cache_kw):  # fmt: skip
    """A cache of n tokens with page summaries, then the write of token n (the query q); with
    `needle`, that token's key is the query's direction, scaled up; `pages_alike`: the tokens of
    a page near each other, as neighbouring tokens' keys and values are. `cache_kw`: KVCache's."""
    k, v = kv_data(n + 1, seed=n + seed)
    if pages_alike:
        m = n // PAGE * PAGE
        for t in (k, v):
            pages = t[:, :m].reshape(H, -1, PAGE, D)
            t[:, :m] = (pages[:, :, :1] + 0.3 * pages).reshape(H, m, D)
    q = torch.randn(HQ, D, generator=torch.Generator().manual_seed(seed + 7))
    if needle is not None:
        k[:, needle] = q.reshape(H, -1, D)[:, 0] * 3
    cache = KVCache(cfg, 1, H, D, 1024, **cache_kw)
    fill(cache, k[:, :n], v[:, :n], 64)
    cache.begin(1)
    kf, vf = cache.write(0, k[:, n:], v[:, n:])
    return cache, q, kf, vf


def cfg_of(k_bits=16, v_bits=16, **kw) -> KVConfig:
    kw = {"window": 64, "k_group": 64, "v_group": 32, "sink": 32, "page_summary": "meanstd"} | kw
    return KVConfig(k_bits, v_bits, **kw)


@pytest.mark.parametrize("kind", ["meanstd", "minmax", "keys"])
@pytest.mark.parametrize("score", ["mass", "max"])
def test_a_page_that_holds_the_querys_key_is_selected(kind, score):
    """A 'needle' key aligned with the query, in one page among many: that page is chosen, as
    are the sink pages, and the list is ascending."""
    page = 23  # of the 40 quantized ones
    cfg = cfg_of(page_summary=kind, page_score=score)
    cache, q, kf, vf = sparse_case(cfg, 700, needle=page * PAGE + 5)
    pages, _ = attention.select_pages_reference(cache, 0, q, keep=6, first=2)
    assert pages.shape == (H, 6) and pages.dtype == torch.int32
    for h in range(H):
        row = pages[h].tolist()
        assert row[:2] == [0, 1] and page in row and row == sorted(row)


@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (4, 4), (2, 2)])
def test_all_pages_selected_is_dense_attention(k_bits, v_bits):
    cfg = cfg_of(k_bits, v_bits, v_rotate=k_bits == 2, v_sym=k_bits == 2)
    cache, q, kf, vf = sparse_case(cfg, 500)
    every = torch.arange(cache.qend(501) // PAGE, dtype=torch.int32).expand(H, -1)
    dense = attention.decode_reference(cache, 0, q, kf, vf)
    sparse = attention.decode_reference(cache, 0, q, kf, vf, every)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def kernel_or_skip():
    kernel = native.load()
    if kernel is None:
        pytest.skip(f"native extension unavailable here: {native.status()}")
    return kernel


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["meanstd", "minmax", "keys"])
def test_native_page_selection_matches_the_reference(seed, kind):
    """The same pages as the reference, and the same estimates of each page as one token."""
    kernel = kernel_or_skip()
    cache, q, kf, vf = sparse_case(cfg_of(4, 4, page_summary=kind), 900, seed)
    n_pages, l2 = cache.qend(901) // PAGE, kind == "meanstd"
    t = cache.layer_tensors(0)
    summaries = t[10], t[11], *t[16:20]
    for score, channels in (("mass", 16), ("max", 16), ("max", 0), ("max", 5)):
        cache.cfg = dataclasses.replace(cache.cfg, page_score=score, score_channels=channels)
        for keep, first in ((8, 2), (20, 2), (n_pages - 1, 1), (3, 0)):
            ref, ref_est = attention.select_pages_reference(cache, 0, q, keep, first)
            got, est = kernel.select_pages(q, *summaries, n_pages, keep, first, l2,
                                           score == "mass", cache.cfg.k_group, channels,
                                           1 / D**0.5, True)  # fmt: skip
            assert torch.equal(got, ref), (keep, first, score, channels)
            torch.testing.assert_close(
                est[:, :, first:], ref_est[:, :, first:], rtol=1e-4, atol=1e-4
            )  # pages before `first` are always read
    with pytest.raises(RuntimeError, match="first <= keep < n_pages"):
        kernel.select_pages(q, *summaries, n_pages, n_pages, 2, l2, True, cache.cfg.k_group, 16,
                            1 / D**0.5, True)  # fmt: skip


@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (8, 8), (4, 4), (2, 2), (4, 2), (16, 4)])
@pytest.mark.parametrize(
    "v_rotate,estimate,kind",
    [(False, True, "meanstd"), (True, True, "meanstd"), (False, False, "meanstd"),
     (False, True, "keys")],
)  # fmt: skip
def test_native_sparse_kernel_matches_the_reference(k_bits, v_bits, v_rotate, estimate, kind):
    """The kernel on a page list, pages of different K groups and the sink among them, against
    the reference on the same list (the selection is tested above), the pages not read estimated
    or left out."""
    kernel_or_skip()
    rotate = v_rotate and v_bits < 16
    cfg = cfg_of(k_bits, v_bits, v_clip=True, v_rotate=rotate, v_sym=rotate,
                 estimate_rest=estimate, page_summary=kind)  # fmt: skip
    cache, q, kf, vf = sparse_case(cfg, 700)
    keep, first = 9, 2
    ref = attention.decode_reference(
        cache, 0, q, kf, vf, *attention.select_pages_reference(cache, 0, q, keep, first)
    )
    out = attention.decode(cache, 0, q, kf, vf, use_native=True, keep=keep, first=first)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    dense = attention.decode(cache, 0, q, kf, vf, use_native=True)
    assert not torch.allclose(out, dense, atol=1e-3)  # 9 of 40 pages is not all of them


@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (4, 4)])
def test_the_pages_not_read_are_estimated_from_their_means(k_bits, v_bits):
    """Spread attention (random pages of alike tokens): 9 of 40 pages read alone miss most of
    it; each skipped page counted as its mean key and value brings the output much nearer dense
    attention (with
    every page read there is nothing to estimate: test_all_pages_selected_is_dense_attention)."""
    cfg = cfg_of(k_bits, v_bits)
    cache, q, kf, vf = sparse_case(cfg, 700, pages_alike=True)
    dense = attention.decode_reference(cache, 0, q, kf, vf)
    pages, est = attention.select_pages_reference(cache, 0, q, 9, 2)
    estimated = attention.decode_reference(cache, 0, q, kf, vf, pages, est)
    alone = dataclasses.replace(cfg, estimate_rest=False)
    bare, *_ = sparse_case(alone, 700, pages_alike=True)
    assert bare.vcent.numel() == 0
    left_out = attention.decode_reference(bare, 0, q, kf, vf, pages)
    error = [float((x - dense).norm() / dense.norm()) for x in (estimated, left_out)]
    assert error[0] < 0.3 * error[1], error


def test_a_bad_page_list_is_refused():
    kernel = kernel_or_skip()
    cache, q, kf, vf = sparse_case(cfg_of(), 300)
    t = cache.layer_tensors(0)
    q1 = cache.qend(301)
    bad = torch.tensor([[0, q1 // PAGE]] * H, dtype=torch.int32)  # one page past the end
    estimates = torch.zeros(H, HQ // H, q1 // PAGE)
    with pytest.raises(RuntimeError, match="past the quantized tokens"):
        kernel.decode_attention(q, *t[:10], t[13], bad, t[14], t[15], estimates, t[12], q1,
                                301 - q1, 16, 16, 64, 32, 0.125)  # fmt: skip
    unsorted = torch.tensor([[0, 3, 2]] * H, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="must be ascending"):
        kernel.decode_attention(q, *t[:10], t[13], unsorted, t[14], t[15], estimates, t[12], q1,
                                301 - q1, 16, 16, 64, 32, 0.125)  # fmt: skip


@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (8, 8), (4, 4), (2, 2), (4, 2), (16, 4)])
def test_pages_on_disk_attend_exactly_as_pages_in_ram(k_bits, v_bits, tmp_path):
    """The same tokens with their pages in RAM, and in a file under a pool of 3 pages per head
    (so every step reads some from disk and evicts others): the same keys and values back, the
    same attention bit for bit, sparse and dense, step after step."""
    kernel_or_skip()
    cfg = cfg_of(k_bits, v_bits, v_clip=True, v_rotate=v_bits == 2, v_sym=v_bits == 2)
    ram = sparse_case(cfg, 700)
    probe = KVCache(cfg, 1, H, D, 1024)
    fixed, rec = probe.fixed_bytes, probe.rec
    disk = sparse_case(cfg, 700, kv_ram=fixed + rec * H * 9, kv_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # the page file is unlinked once open
    q1 = ram[0].qend(701)
    for a, b in zip(ram[0].dequant_kv(0, q1), disk[0].dequant_kv(0, q1), strict=True):
        assert torch.equal(a, b)
    for keep, first, seed in [(9, 2, 0), (5, 2, 1), (9, 2, 2)]:  # other queries: other pages
        q = torch.randn(HQ, D, generator=torch.Generator().manual_seed(seed))
        got = [
            attention.decode(c, 0, q, kf, vf, keep=keep, first=first)
            for c, _, kf, vf in (ram, disk)
        ]
        assert torch.equal(*got)
    hits, misses, _, resident, _, _ = disk[0].pages.stats()
    assert misses > 0 and resident == 9 * H
    assert disk[0].nbytes == fixed + rec * H * 9 and disk[0].offloaded_bytes() > 0
    with pytest.raises(RuntimeError, match="cannot hold one layer"):  # dense needs every page
        attention.decode(disk[0], 0, disk[1], disk[2], disk[3])
    big = sparse_case(cfg, 700, kv_ram=fixed + rec * H * 64, kv_dir=tmp_path)
    dense = [attention.decode(c, 0, c_q, kf, vf) for c, c_q, kf, vf in (ram, big)]
    assert torch.equal(*dense)


def test_read_ahead_brings_back_the_next_layers_pages_of_the_step_before(tmp_path):
    """Pages on disk, a pool smaller than a step's pages (3 layers × 2 heads × 9 pages, 40
    slots): once a layer's pages are resident, the next layer's pages of the step before come
    back in the background, so the next step finds every page it asked for last time in the
    pool, reads nothing from disk, and attends exactly as the cache all in RAM does."""
    kernel_or_skip()
    cfg = cfg_of(4, 4, page_summary="keys")
    k, v = kv_data(701, seed=700)
    q = torch.randn(HQ, D, generator=torch.Generator().manual_seed(7))
    probe = KVCache(cfg, 3, H, D, 1024)
    ram = KVCache(cfg, 3, H, D, 1024)
    disk = KVCache(cfg, 3, H, D, 1024, kv_ram=probe.fixed_bytes + probe.rec * 40,
                   kv_dir=tmp_path, read_ahead=1)  # fmt: skip
    outs = {}
    for name, cache in (("ram", ram), ("disk", disk)):
        for i in range(0, 700, 64):
            j = min(i + 64, 700)
            cache.begin(j - i)
            for layer in range(3):
                cache.write(layer, k[:, i:j], v[:, i:j])
            cache.commit()
        cache.begin(1)
        kv = [cache.write(layer, k[:, 700:], v[:, 700:]) for layer in range(3)]
        steps = []
        for step in range(2):  # the same query twice: the same pages
            for layer in range(3):
                steps.append(attention.decode(cache, layer, q, *kv[layer], keep=9, first=2))
                if name == "disk":  # the reads ahead done before the next layer asks
                    disk.pages.wait()
            if name == "disk":
                outs[step] = disk.pages.stats()
        outs[name] = steps
    for a, b in zip(outs["ram"], outs["disk"], strict=True):
        assert torch.equal(a, b)
    _, misses, _, _, ahead, used = outs[0]
    assert misses > 0 and ahead > 0 and used == 0  # step 1 read; then layer 0 came back
    _, misses2, _, _, ahead2, used2 = outs[1]
    assert misses2 == misses  # step 2 read nothing from disk itself: every page was back
    assert used2 >= ahead and ahead2 > ahead  # the pages read ahead were the ones asked for


# ---- the runner (SmolLM2-135M: 30 layers, 3 KV heads) ----------------------------------------

CTX = 2048


@pytest.fixture(scope="module")
def engines(model_path):
    dense = TorchEngine(model_path, TEST_MODEL, context_length=CTX, threads=1)
    sparse = TorchEngine(model_path, TEST_MODEL, context_length=CTX, threads=1, attn_budget=512)
    yield dense, sparse
    dense.close()
    sparse.close()


def test_budget_flags_and_errors(model_path, engines):
    dense, sparse = engines
    assert sparse.info()["attn_budget"] == 512 and dense.info()["attn_budget"] == 0
    with pytest.raises(Exception, match="below 512 tokens"):
        TorchEngine(model_path, TEST_MODEL, context_length=CTX, attn_budget="10%")  # 204
    with pytest.raises(Exception, match="an attention budget is a size"):
        TorchEngine(model_path, TEST_MODEL, context_length=CTX, attn_budget="lots")


def greedy(engine, prompt: str, n: int = 12):
    events = list(
        chat(engine, [Message("user", prompt)], SamplingParams(temperature=0.0, max_tokens=n))
    )
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events[:-1]), events[-1].stats


def pydoc_tokens(engine, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return engine.tokenize(text[: n * 8], special=False)[:n]


@pytest.mark.slow
def test_under_the_budget_the_output_is_bit_identical(engines):
    """Up to 512 tokens every step is dense: the same logits, bit for bit, as no budget."""
    dense, sparse = engines
    prompt = "Write a short poem about the sea, then explain it. " * 6
    assert greedy(sparse, prompt, 24)[0] == greedy(dense, prompt, 24)[0]
    tokens = pydoc_tokens(sparse, 511)
    logits = []
    for eng in (dense, sparse):
        m = eng.model
        m.cache.reset()
        m.forward(torch.tensor(tokens[:300]))
        logits.append(torch.stack([m.forward(torch.tensor([t]))[-1] for t in tokens[300:]]))
    assert torch.equal(logits[0], logits[1])
    assert sparse.model.attn_stats.sparse_steps == 0


@pytest.mark.slow
def test_over_the_budget_it_reads_less_and_predicts_alike(engines):
    """Teacher-forced decode of real text past the budget: the top token agrees with dense
    attention at almost every step while each step reads a fraction of the KV."""
    dense, sparse = engines
    tokens = pydoc_tokens(sparse, 1700)
    tops, read, nll = [], [], []
    for eng in (dense, sparse):
        m = eng.model
        m.cache.reset()
        m.forward(torch.tensor(tokens[:1600]))
        before = m.attn_stats.bytes_read
        logits = torch.stack([m.forward(torch.tensor([t]))[-1] for t in tokens[1600:-1]])
        read.append(m.attn_stats.bytes_read - before)
        tops.append(logits.argmax(-1))
        nll.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1601:]))))
    agree = float((tops[0] == tops[1]).float().mean())
    print(f"agree {agree:.3f} nll {nll} read {read[1] / read[0]:.3f}")
    assert agree >= 0.9 and nll[1] < nll[0] * 1.04, (agree, nll)
    assert read[1] < 0.45 * read[0], read
    # the request stats a user sees (run --json, the HTTP API)
    _, stats = greedy(sparse, sparse.detokenize(tokens[:1000]), 8)
    assert stats.extra["attn_pages_selected"] > 0 and stats.extra["attn_sparse_steps"] >= 7
    assert stats.extra["kv_bytes_read_per_token"] > 0 and stats.extra["kv_resident_bytes"] > 0


@pytest.mark.slow
def test_pages_on_disk_under_a_kv_budget_change_nothing_but_memory(model_path, engines, tmp_path):
    """The same sparse engine with a 14 MiB KV budget (the cache all in RAM is ~56 MiB; the
    pool holds about a third of one step's pages, so every step reads pages from disk):
    teacher-forced logits bit for bit and greedy text equal to the all-in-RAM run."""
    _, sparse = engines
    disk = TorchEngine(model_path, TEST_MODEL, context_length=CTX, threads=1, attn_budget=512,
                       kv_budget="14M", kv_dir=tmp_path)  # fmt: skip
    cache = disk.model.cache
    too_small = cache.fixed_bytes + 50 * cache.rec  # 50 pages: fewer than one layer's step
    try:
        assert cache.nbytes <= 14 << 20 < sparse.model.cache.nbytes
        tokens = pydoc_tokens(sparse, 1200)
        logits = []
        for eng in (sparse, disk):
            m = eng.model
            m.cache.reset()
            m.forward(torch.tensor(tokens[:1100]))
            logits.append(torch.stack([m.forward(torch.tensor([t]))[-1] for t in tokens[1100:]]))
        assert torch.equal(logits[0], logits[1])
        prompt = sparse.detokenize(tokens[:900])
        text, stats = greedy(disk, prompt, 8)
        assert text == greedy(sparse, prompt, 8)[0]
        assert stats.extra["kv_disk_bytes_read_per_token"] > 0
        assert 0 <= stats.extra["kv_read_ahead_recall"] <= 1  # the read-ahead thread ran beside
        assert stats.extra["kv_offloaded_bytes"] > 0 and disk.info()["kv_pool_pages"] > 0
    finally:
        disk.close()
    with pytest.raises(Exception, match="needs an attention budget"):
        TorchEngine(model_path, TEST_MODEL, context_length=CTX, kv_budget="14M")
    with pytest.raises(Exception, match="cannot hold the .* pages one layer"):
        TorchEngine(model_path, TEST_MODEL, context_length=CTX, attn_budget=512,
                    kv_budget=too_small)  # fmt: skip


def test_the_kv_budget_not_named_is_what_the_ram_budget_leaves(model_path, engines, tmp_path):
    """Given the RAM the governor leaves it, an engine keeps its KV cache all in RAM when it
    fits beside the weights and the runtime, puts its pages past what is left on disk when
    it does not (with an attention budget), and without one refuses, saying what to change."""
    from localai.engine.torch.fit import read_shape, resident_bytes

    _, sparse = engines
    resident = resident_bytes(read_shape(model_path))
    roomy = TorchEngine(model_path, TEST_MODEL, context_length=CTX, threads=1, attn_budget=512,
                        ram_budget=resident + (1 << 30))  # fmt: skip
    tight = TorchEngine(model_path, TEST_MODEL, context_length=CTX, threads=1, attn_budget=512,
                        ram_budget=resident + (14 << 20), kv_dir=tmp_path)  # fmt: skip
    try:
        assert roomy.model.cache.pages is None
        assert roomy.model.cache.nbytes == sparse.model.cache.nbytes
        cache = tight.model.cache
        assert cache.pages is not None and cache.nbytes <= 14 << 20
        assert cache.nbytes > (14 << 20) - cache.rec  # all of what was left
        assert tight.info()["ram_budget_bytes"] == resident + (14 << 20)
    finally:
        roomy.close()
        tight.close()
    with pytest.raises(Exception, match=r"KV cache needs .* MiB.*--attn-budget"):
        TorchEngine(model_path, TEST_MODEL, context_length=CTX, ram_budget=resident + (14 << 20))


# ---- sparse prefill ------------------------------------------------------------------------


def chunk_case(cfg: KVConfig, n: int, c: int, needle: int | None = None):
    """A cache of n tokens, then the write of a chunk of c; the chunk's queries (sharing a
    direction per KV head), and with `needle` that token's key along that direction."""
    k, v = kv_data(n + c, seed=n)
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(H, 1, 1, D, generator=g)
    q = (torch.randn(H, HQ // H, c, D, generator=g) + shared).reshape(HQ, c, D)
    if needle is not None:
        k[:, needle] = shared[:, 0, 0] * 3
    cache = KVCache(cfg, 1, H, D, 2048)
    fill(cache, k[:, :n], v[:, :n], 64)
    cache.begin(c)
    kf, vf = cache.write(0, k[:, n:], v[:, n:])
    return cache, q, kf, vf


@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (4, 4), (2, 2)])
def test_a_chunk_reading_every_page_is_dense_prefill(k_bits, v_bits):
    cfg = cfg_of(k_bits, v_bits, v_rotate=k_bits == 2, v_sym=k_bits == 2)
    cache, q, kf, vf = chunk_case(cfg, 700, 100)
    dense = attention.prefill(cache, 0, q, kf, vf)
    old = cache.qend(700) // PAGE  # pages older than the chunk's window (36)
    every = attention.prefill(cache, 0, q, kf, vf, keep=old, first=1)  # sums in another order
    torch.testing.assert_close(every, dense, rtol=1e-4, atol=1e-5)
    fewer = attention.prefill(cache, 0, q, kf, vf, keep=6, first=2)
    assert not torch.allclose(fewer, dense, atol=1e-3)


@pytest.mark.parametrize("k_bits,v_bits,estimate", [(16, 16, True), (4, 4, True), (4, 4, False)])
def test_a_sparse_chunk_of_one_query_reads_what_sparse_decode_reads(k_bits, v_bits, estimate):
    """Sparse prefill attends as sparse decode does: the chosen pages exactly, the others (with
    estimate_rest) as their estimates; a chunk of one query gives decode's output."""
    cfg = cfg_of(k_bits, v_bits, estimate_rest=estimate)
    cache, q, kf, vf = chunk_case(cfg, 700, 1)  # no K group completes: the same quantized pages
    old = cache.qend(700) // PAGE
    pages = attention.select_chunk_pages(cache, q, 8, 2, cache.dequant_k(0, old * PAGE))
    got = attention.prefill(cache, 0, q, kf, vf, keep=8, first=2)[:, 0]
    est = attention.centre_estimates(cache, 0, q[:, 0].reshape(H, -1, D), old) if estimate else None
    want = attention.decode_reference(cache, 0, q[:, 0], kf, vf, pages, est)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, attention.decode_reference(cache, 0, q[:, 0], kf, vf), atol=1e-3)


def test_a_chunk_selects_the_page_its_queries_point_at():
    """A prompt chunk scores pages by its queries against the stored keys (no page summary)."""
    page = 17
    cache, q, kf, vf = chunk_case(cfg_of(), 700, 100, needle=page * PAGE + 3)
    old = cache.qend(700) // PAGE  # 36
    pages = attention.select_chunk_pages(cache, q, 8, 2, cache.dequant_k(0, old * PAGE))
    for h in range(H):  # the sink, the needle, the 3 pages before the window (local: (8 - 2) // 2)
        row = pages[h].tolist()
        assert row[:2] == [0, 1] and row[-3:] == [old - 3, old - 2, old - 1] and page in row
        assert row == sorted(row) and len(row) == 8


@pytest.mark.slow
def test_sparse_prefill_scores_long_text_close_to_dense(model_path, engines):
    """With --sparse-prefill a prompt's chunks past the budget read the sink, the pages before
    them, the pages a sample of their queries wants most and the rest as estimates: the text
    scores close to dense attention; under the budget it is dense, bit for bit. Without it
    (the default) a budget leaves the prompt's reading exactly dense."""
    dense, sparse = engines
    tokens = pydoc_tokens(sparse, 1700)
    nll_dense, count = dense.nll(tokens)
    assert not sparse.info()["sparse_prefill"] and sparse.nll(tokens)[0] == nll_dense
    on = TorchEngine(model_path, TEST_MODEL, context_length=CTX, threads=1, attn_budget=512,
                     sparse_prefill=True)  # fmt: skip
    try:
        assert on.info()["sparse_prefill"]
        short = [e.nll(tokens[:500]) for e in (dense, on)]
        nll_sparse, _ = on.nll(tokens)
    finally:
        on.close()
    assert short[0] == short[1]
    print(f"nll per token dense {nll_dense / count:.4f} sparse {nll_sparse / count:.4f}")
    assert nll_dense < nll_sparse < nll_dense * 1.05
