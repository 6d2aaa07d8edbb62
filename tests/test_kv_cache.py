"""The paged, quantized KV cache and decode attention: packing, chunk invariance, prefill/decode
agreement, and the native kernel against its pure-torch reference (both paths are exercised)."""

import dataclasses
import math

import pytest
import torch

from localai.engine.torch import attention, kv, kvquant, native
from localai.engine.torch.kv import PAGE, KVCache, KVConfig, vcent_bytes

H, HQ, D = 2, 6, 64


def fill(cache: KVCache, k: torch.Tensor, v: torch.Tensor, chunk: int):
    """Write K, V [H, N, D] into layer 0 in chunks of `chunk` tokens."""
    for i in range(0, k.shape[1], chunk):
        cache.begin(k[:, i : i + chunk].shape[1])
        cache.write(0, k[:, i : i + chunk], v[:, i : i + chunk])
        cache.commit()


def kv_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, n, D, generator=g)
    k[:, :, 3] *= 20  # an outlier channel, as real keys have
    return k, torch.randn(H, n, D, generator=g)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_roundtrip_and_error_bound(bits):
    codes = torch.randint(0, 1 << bits, (5, 7, D), dtype=torch.uint8)
    assert torch.equal(kvquant.unpack(kvquant.pack(codes, bits), bits), codes)
    x = torch.randn(4, 32, D)
    c, scale, lo = kvquant.quantize(x, bits, dim=1)
    err = (kvquant.dequantize(c, scale, lo) - x).abs()
    assert (err <= scale.float() * 0.5 + 1e-3).all()


def test_clipped_range_never_has_more_error():
    x = torch.randn(3, 40, 2, 32)
    x[0, 0, 0, 5] = 30.0  # an outlier clipping gives up on
    for bits in (2, 4):
        plain = kvquant.dequantize(*kvquant.quantize(x, bits, dim=3))
        clipped = kvquant.dequantize(*kvquant.quantize(x, bits, dim=3, clip=True))
        err_plain = ((plain - x) ** 2).sum(dim=3)
        err_clip = ((clipped - x) ** 2).sum(dim=3)
        assert (err_clip <= err_plain + 1e-6).all() and err_clip.sum() < err_plain.sum()


@pytest.mark.parametrize("bits", [4, 2])
def test_symmetric_codes_are_within_half_a_step_and_clipping_never_hurts(bits):
    x = torch.randn(3, 40, 2, 32)
    x[0, 0, 0, 5] = 30.0
    codes, scale = kvquant.quantize_sym(x, bits, dim=3)
    plain = kvquant.dequantize_sym(codes, scale, bits)
    assert (codes < (1 << bits)).all()
    assert ((plain - x).abs() <= scale.float() * 0.5 + 1e-3).all()
    clipped = kvquant.dequantize_sym(*kvquant.quantize_sym(x, bits, dim=3, clip=True), bits)
    err_plain = ((plain - x) ** 2).sum(dim=3)
    err_clip = ((clipped - x) ** 2).sum(dim=3)
    assert (err_clip <= err_plain + 1e-6).all() and err_clip.sum() < err_plain.sum()


def test_sink_tokens_are_stored_exactly_and_kept_out_of_the_first_group():
    cfg = KVConfig(k_bits=2, v_bits=2, window=32, k_group=64, sink=16)
    k, v = kv_data(200)
    k[:, 0] *= 50  # the sink's outlier keys
    cache = KVCache(cfg, 1, H, D, 256)
    fill(cache, k, v, 37)
    end = cache.qend(200)
    assert torch.equal(cache.dequant_k(0, end)[:, :16], k[:, :16].half().float())
    assert torch.equal(cache.dequant_v(0, end)[:, :16], v[:, :16].half().float())
    # the first group's range is that of tokens [16, 64), not widened by token 0
    lo = cache.km[0, :, 0].float()  # H, D
    hi = lo + cache.ks[0, :, 0].float() * 3
    rest = k[:, 16:64].half().float()
    slack = 1e-2 * rest.abs().amax()
    assert (hi <= rest.amax(dim=1) + slack).all() and (lo >= rest.amin(dim=1) - slack).all()


def test_rotated_v_round_trips_within_the_quantization_error():
    assert torch.allclose(kv.hadamard(64) @ kv.hadamard(64).T, torch.eye(64), atol=1e-6)
    k, v = kv_data(300)
    err = {}
    for rotate in (False, True):
        cache = KVCache(KVConfig(16, 4, window=32, k_group=64, v_rotate=rotate), 1, H, D, 512)
        fill(cache, k, v, 64)
        end = cache.qend(300)
        err[rotate] = float((cache.dequant_v(0, end) - v[:, :end]).pow(2).mean())
    assert err[True] < 2 * err[False]  # Gaussian rows: the rotation neither helps nor hurts much


def test_chunking_does_not_change_what_is_stored():
    cfg = KVConfig(k_bits=4, v_bits=2, window=32, k_group=32, v_group=32, sink=16)
    k, v = kv_data(300)
    a, b = KVCache(cfg, 1, H, D, 512), KVCache(cfg, 1, H, D, 512)
    fill(a, k, v, 1)
    fill(b, k, v, 77)
    q_end = a.qend(300)
    assert q_end == b.qend(300) == 256 and a.n == b.n == 300
    assert torch.equal(a.dequant_k(0, q_end), b.dequant_k(0, q_end))
    assert torch.equal(a.dequant_v(0, q_end), b.dequant_v(0, q_end))
    assert torch.equal(a.kbuf[0, :, : 300 - q_end], b.kbuf[0, :, : 300 - q_end])
    # the fp16 window holds the newest tokens exactly (to fp16)
    assert torch.equal(a.kbuf[0, :, : 300 - q_end], k[:, q_end:].half())


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("kind", ["meanstd", "minmax", "keys"])
def test_page_summaries_describe_each_pages_own_keys(bits, kind):
    """Per page (not per quantization group), sink included, from the fp16 keys; and the mean
    of each page's fp16 values, to 4 bits (what a sparse step counts a page it skips as).
    "keys": a 4-bit copy of every key with its groups' means, the sink's outliers kept out of
    its ranges, and no per-page key summary."""
    cfg = KVConfig(k_bits=bits, v_bits=bits, window=16, k_group=32, sink=16, page_summary=kind)
    k, v = kv_data(200)
    cache = KVCache(cfg, 1, H, D, 256)
    fill(cache, k, v, 50)
    pages = cache.qend(200) // PAGE
    cent, spread, vmean = cache.page_summaries(0, pages)
    assert vmean.shape == (H, pages, D)
    values = v[:, : pages * PAGE].half().float().reshape(H, pages, PAGE, D)
    width = values.mean(dim=2).amax(dim=2) - values.mean(dim=2).amin(dim=2)  # H, pages
    error = (vmean - values.mean(dim=2)).abs().amax(dim=2)
    assert (error <= width / 30 * 1.01 + 1e-3).all()  # half a 4-bit step of each row's range
    keys = k[:, : pages * PAGE].half().float().reshape(H, pages, PAGE, D)
    plain = KVCache(dataclasses.replace(cfg, page_summary=""), 1, H, D, 256)
    means = H * vcent_bytes(D) / PAGE
    if kind == "keys":
        assert cent.numel() == spread.numel() == 0
        copy = cache.key_copy(0, pages * PAGE)  # H, n, D
        exact = keys.reshape(H, -1, D)
        exact[:, :16] = exact[:, 16:17]  # the sink's keys: token 16 in their place
        g = exact.unflatten(1, (-1, cfg.k_group))  # H, groups, G, D
        width = (g.amax(dim=2) - g.amin(dim=2)).repeat_interleave(cfg.k_group, dim=1)
        assert ((copy - exact).abs() <= width / 30 * 1.01 + 1e-3).all()
        group_means = copy.unflatten(1, (-1, cfg.k_group)).mean(dim=2)
        torch.testing.assert_close(cache.kcmu[0, :, : pages * PAGE // cfg.k_group].float(),
                                   group_means, rtol=1e-3, atol=1e-3)  # fmt: skip
        more = cache.bytes_per_token() - plain.bytes_per_token()
        assert more == pytest.approx(H * D * (4 / 8 + 3 * 2 / cfg.k_group) + means)
        return
    assert cent.shape == spread.shape == (H, pages, D)
    if kind == "minmax":  # the box [centre - spread, centre + spread] holds every key
        lo, hi = keys.amin(dim=2), keys.amax(dim=2)
        torch.testing.assert_close(cent.float(), (lo + hi) / 2, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(spread.float(), (hi - lo) / 2, rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(cent.float(), keys.mean(dim=2), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(spread.float(), keys.std(dim=2, correction=0), rtol=1e-3,
                                   atol=1e-3)  # fmt: skip
    assert cache.bytes_per_token() == pytest.approx(
        plain.bytes_per_token() + 2 * H * D * 2 / PAGE + means
    )
    alone = KVCache(dataclasses.replace(cfg, estimate_rest=False), 1, H, D, 256)
    assert alone.vcent.numel() == 0 and alone.page_summaries(0, pages)[2].numel() == 0


def test_bytes_per_token_meet_the_budget():
    fp16 = KVCache(KVConfig(16, 16), 1, 2, 64, 4096).bytes_per_token()
    four = KVCache(KVConfig(4, 4), 1, 2, 64, 4096).bytes_per_token()
    two = KVCache(KVConfig(2, 2, k_group=64, v_sym=True), 1, 2, 64, 4096).bytes_per_token()
    k4v2 = KVCache(KVConfig(4, 2, k_group=256, v_sym=True), 1, 2, 64, 4096).bytes_per_token()
    assert fp16 == 2 * 2 * 64 * 2
    assert four <= 0.28 * fp16 and two <= 0.15 * fp16 and k4v2 <= 0.2 * fp16


def decode_case(cfg: KVConfig, n: int):
    """A cache holding n tokens, then the write of token n; returns what decode needs."""
    k, v = kv_data(n + 1, seed=n)
    cache = KVCache(cfg, 1, H, D, 1024)
    fill(cache, k[:, :n], v[:, :n], 64)
    cache.begin(1)
    kf, vf = cache.write(0, k[:, n:], v[:, n:])
    q = torch.randn(HQ, D, generator=torch.Generator().manual_seed(7))
    return cache, q, kf, vf


@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (8, 8), (4, 4), (2, 2), (4, 2), (16, 4)])
@pytest.mark.parametrize("v_rotate", [False, True])
def test_prefill_and_decode_reference_agree(k_bits, v_bits, v_rotate):
    """The last query of a prefill chunk sees exactly what a decode step at that position sees."""
    cfg = KVConfig(k_bits, v_bits, window=32, k_group=32, v_group=32, sink=16, v_rotate=v_rotate,
                   v_sym=v_rotate)  # fmt: skip
    cache, q, kf, vf = decode_case(cfg, 200)
    ref = attention.decode_reference(cache, 0, q, kf, vf)
    pre = attention.prefill(cache, 0, q[:, None, :], kf, vf)[:, 0]  # Hq, D
    torch.testing.assert_close(pre, ref, rtol=1e-4, atol=1e-5)


def test_a_long_prompts_attention_in_two_passes_equals_one_masked_pass():
    """Prefill reads the keys every query of a chunk sees whole (the older quantized ones) in a
    pass without a mask, the rest with it, and merges the two by their log-sum-exps."""
    assert attention._FLASH is not None  # torch's fused CPU attention with log-sum-exp
    g = torch.Generator().manual_seed(3)
    q = torch.randn(HQ, 40, D, generator=g)
    k, v = (torch.randn(H, 300, D, generator=g) for _ in range(2))
    mask = torch.rand(40, 300, generator=g) < 0.5
    mask[:, :200] = True
    one = attention._attend(q, k, v, mask)
    two = attention._attend_split(q, k[:, :200], v[:, :200], k[:, 200:], v[:, 200:], mask[:, 200:])
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("k_bits,v_bits", [(16, 16), (8, 8), (4, 4), (2, 2), (4, 2), (16, 4)])
@pytest.mark.parametrize("n", [5, 200, 700])
@pytest.mark.parametrize("sink,v_rotate", [(0, False), (32, True)])
def test_native_kernel_matches_reference(k_bits, v_bits, n, sink, v_rotate):
    kernel = native.load()
    if kernel is None:
        pytest.skip(f"native extension unavailable here: {native.status()}")
    cfg = KVConfig(k_bits, v_bits, window=64, k_group=64, v_group=32, sink=sink, v_clip=True,
                   v_rotate=v_rotate, v_sym=v_rotate)  # fmt: skip
    cache, q, kf, vf = decode_case(cfg, n)
    ref = attention.decode_reference(cache, 0, q, kf, vf)
    out = attention.decode(cache, 0, q, kf, vf, use_native=True)
    # fp32 accumulation in a different order (and -ffast-math): relative 1e-4 of the output scale
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not math.isnan(float(out.sum()))


def fill_named(cache: KVCache, k, v, ids, chunk):
    for i in range(0, len(ids), chunk):
        cache.begin(len(ids[i : i + chunk]))
        cache.write(0, k[:, i : i + chunk], v[:, i : i + chunk])
        cache.commit(ids[i : i + chunk])


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("bits", [16, 4, 2])
@pytest.mark.parametrize("cut", [299, 290, 250, 200, 150, 64, 0])
def test_truncate_then_refill_equals_a_fresh_cache(bits, cut, disk, tmp_path):
    """Cutting back to a prefix and writing a different continuation leaves the cache exactly as
    if the new sequence had been written from the start (sink, pages, window, the quantized
    tokens held in fp16); a quantized cache cut back beyond the tokens it holds in fp16 (its
    newest 128: 128-256 here) starts over instead. The same with the pages in a file
    under a pool of 4 pages per head (`disk`)."""
    rotate = bits == 2
    cfg = KVConfig(k_bits=bits, v_bits=bits, window=32, k_group=64, v_group=32, sink=16,
                   v_clip=rotate, v_rotate=rotate, v_sym=rotate, held=128)  # fmt: skip
    k, v = kv_data(300)
    k2, v2 = kv_data(300, seed=1)
    ids = list(range(300))
    new_ids = ids[:cut] + [1000 + i for i in range(300 - cut)]
    k_new = torch.cat([k[:, :cut], k2[:, cut:]], dim=1)
    v_new = torch.cat([v[:, :cut], v2[:, cut:]], dim=1)
    fresh = KVCache(cfg, 1, H, D, 512)
    if disk and native.load() is None:
        pytest.skip(f"KV pages on disk need the C++ kernels: {native.status()}")
    budget = {"kv_ram": fresh.fixed_bytes + 4 * H * fresh.rec, "kv_dir": tmp_path} if disk else {}
    a = KVCache(cfg, 1, H, D, 512, **budget)
    fill_named(a, k, v, ids, 50)
    assert a.exact_from == (128 if bits < 16 else 0)
    exact = a.qend(cut) >= a.exact_from
    kept = a.truncate(cut)
    assert kept == (cut if exact else 0) and a.n == kept and a.ids == ids[:kept]
    assert bits == 16 or exact == (cut >= 200)
    fill_named(a, k_new[:, kept:], v_new[:, kept:], new_ids[kept:], 7)
    fill_named(fresh, k_new, v_new, new_ids, 64)
    q_end = fresh.qend(300)
    assert a.n == fresh.n == 300 and a.ids == new_ids and a.qend(a.n) == q_end
    assert torch.equal(a.dequant_k(0, q_end), fresh.dequant_k(0, q_end))
    assert torch.equal(a.dequant_v(0, q_end), fresh.dequant_v(0, q_end))
    assert torch.equal(a.kbuf[0, :, : 300 - q_end], fresh.kbuf[0, :, : 300 - q_end])
    assert torch.equal(a.vbuf[0, :, : 300 - q_end], fresh.vbuf[0, :, : 300 - q_end])
    assert torch.equal(a.ksink, fresh.ksink) and torch.equal(a.vsink, fresh.vsink)
    held = q_end - fresh.exact_from if bits < 16 else 0
    assert a.exact_from == fresh.exact_from and held == (128 if bits < 16 else 0)
    assert torch.equal(a.kprev[0, :, :held], fresh.kprev[0, :, :held])
    assert torch.equal(a.vprev[0, :, :held], fresh.vprev[0, :, :held])
    assert torch.equal(fresh.kprev[0, :, :held], k_new[:, q_end - held : q_end].half())


def test_a_cache_without_token_ids_is_never_reused():
    cfg = KVConfig(window=32, k_group=64)
    k, v = kv_data(100)
    cache = KVCache(cfg, 1, H, D, 256)
    fill(cache, k, v, 40)  # raw K/V, no ids: nothing says which tokens these are
    assert cache.ids == [] and cache.truncate(50) == 0 and cache.n == 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_long_context_takes_ram_only_as_tokens_arrive():
    """The cache is sized for the whole context but not written at load: a 32K-token fp16 cache
    of 24 layers (384 MiB) commits almost nothing until tokens are stored, and says so."""
    before = _rss()
    cache = KVCache(KVConfig(16, 16, page_summary="meanstd"), 24, H, D, 32768)
    assert cache.nbytes > 380 << 20 and _rss() - before < 32 << 20
    fixed = cache.resident_bytes()
    assert fixed < 32 << 20
    k, v = kv_data(1024)
    cache.begin(1024)
    for layer in range(24):  # 1,024 tokens in every layer
        cache.write(layer, k, v)
    cache.commit()
    grown = cache.resident_bytes() - fixed
    per_token = cache.bytes_per_token()
    assert 0.8 * per_token * (1024 - 256) < grown <= per_token * 1024
    assert _rss() - before < fixed + grown + (32 << 20)
