"""Attention over the paged KV cache: a chunk of queries (prefill) and one query (decode).

Both read keys older than each query's window through their quantized values (see kv.py), so
the result does not depend on how a prompt was chunked. Decode goes to the fused C++ kernel
(native/kv_attention.cpp: unpack, scores, softmax and the V sum in one pass over the pages) when
it built, else to `decode_reference`, the pure-torch definition it is tested against.

Sparse decode (`keep` > 0): each KV head attends to `keep` pages of 16 quantized tokens, the
first `first` (the attention sink) and the rest chosen by `select_pages`, plus the whole fp16
buffer (the recent window). With "keys" (the default) a page scores as its best token's q . k
over the cache's 4-bit copy of every key, read on the `score_channels` channels the KV head's
queries weigh most (the others at their group's mean): one key a head looks for (a needle, the
earlier copy of a passage) decides, which a page's summary blurs. With per-page key summaries
(kv.py: a centre c and spread s per channel) a page scores q . c + |q * s|: with "minmax" (c, s
the middle and half-width of the keys' range) the L1 norm, which makes it the largest q . k any
key in the page's box can give; with "meanstd" (mean, standard deviation) the L2 norm, the mean
score plus one standard deviation. A KV head (its query heads share its pages) combines its
query heads' scores as attention ("mass": each head's softmax over the pages, summed) or by
their maximum ("max").
With the cache's `estimate_rest` every page not read still counts, as one key (its mean: from
the copy's scores with "keys", else the centre) and one value (its mean) standing for its 16
tokens: the softmax then spreads over roughly what dense attention would, and the attention the
skipped pages would get is not handed to the read ones (RetroInfer's estimate zone, with pages
for clusters). (The log-sum-exp of a page's scores over the copy, tried instead, scored both
perplexities of bench/sparse_attention.py worse at 8K.)
Sparse prefill (`Transformer.sparse_prefill`) reads the same way: each chunk of a prompt past
the budget attends to its own tokens and window, the sink, the pages just before it, and the
pages a sample of its queries gives the most attention (`select_chunk_pages`), the others as
their estimates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import native
from .kv import PAGE, KVCache

# Hq query heads, H KV heads, r = Hq / H, C query tokens, N keys, D head dim
SAMPLE = 16  # a prefill chunk's pages are chosen by every SAMPLE-th of its queries
LOCAL = 16  # pages just before a prefill chunk's window that it always reads (its local text)


def prefill(cache: KVCache, layer: int, q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor,
            keep: int = 0, first: int = 0):  # fmt: skip
    """q: [Hq, C, D] for positions [n, n + C); kf, vf: [H, M, D] fp16-exact keys/values of tokens
    [qend(n), n + C) from `cache.write`. Returns [Hq, C, D]. With `keep` (sparse prefill) the
    chunk reads `keep` of the pages older than its window (`select_chunk_pages`) and, with the
    cache's estimate_rest, the others as one estimate each, as decode does."""
    _, c, d = q.shape
    n, n2 = cache.n, cache._n_next
    q0, q1 = cache.qend(n), cache.qend(n2)
    pos = torch.arange(n, n2)  # C
    # fp keys are visible when causal and not yet quantized for this query: j >= qend(p + 1)
    bound = torch.tensor([cache.qend(int(p) + 1) for p in pos])  # C
    keys = torch.arange(q0, n2)  # M
    full_ok = (keys[None, :] <= pos[:, None]) & (keys[None, :] >= bound[:, None])  # C, M
    if q1 == 0:
        return _attend(q, kf, vf, full_ok)
    # quantized keys read whole (sparse: those quantized in this forward), each seen by the
    # queries it is older than the bound of
    fresh = torch.arange(q0 if keep else 0, q1)
    ok = torch.cat([fresh[None, :] < bound[:, None], full_ok], dim=1)  # C, F + M
    if not keep:
        kq, vq = cache.dequant_kv(layer, q1)
        if q0 and _FLASH is not None:  # every query reads [0, q0) whole: no mask there
            return _attend_split(q, kq[:, :q0], vq[:, :q0], torch.cat([kq[:, q0:], kf], dim=1),
                                 torch.cat([vq[:, q0:], vf], dim=1), ok[:, q0:])  # fmt: skip
        return _attend(q, torch.cat([kq, kf], dim=1), torch.cat([vq, vf], dim=1), ok)
    pages = q0 // PAGE
    k_old = cache.dequant_k(layer, pages * PAGE)  # H, pages·16, D
    old = select_chunk_pages(cache, q, keep, first, k_old)  # H, keep
    h = old.shape[0]
    tok = torch.cat([page_tokens(old), fresh.expand(h, -1)], dim=1)
    kq, vq = cache.dequant_kv(layer, tok)  # H, keep·16 + F, D
    bias = torch.zeros(c, ok.shape[1]).masked_fill_(~ok, -math.inf)
    bias = torch.cat([torch.zeros(c, old.shape[1] * PAGE), bias], dim=1)  # C, keep·16 + F + M
    k, v = torch.cat([kq, kf], dim=1), torch.cat([vq, vf], dim=1)
    if cache.vcent.numel():  # the pages not read: their mean key, weighing 16 tokens
        rest = torch.ones(h, pages, dtype=torch.bool).scatter_(1, old, False)
        rest = rest.nonzero()[:, 1].view(h, -1, 1).expand(-1, -1, d)  # H, pages - keep, D
        cent, _, vmeans = cache.page_summaries(layer, pages)  # centres: as decode scores them
        means = cent.float() if cent.numel() else k_old.unflatten(1, (pages, PAGE)).mean(dim=2)
        kc, vc = means.gather(1, rest), vmeans.gather(1, rest)
        k, v = torch.cat([kc, k], dim=1), torch.cat([vc, v], dim=1)
        bias = torch.cat([torch.full((c, rest.shape[1]), math.log(PAGE)), bias], dim=1)
    return _attend(q, k, v, bias)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """Softmax attention of q [Hq, C, D] over k, v [H, N, D] (grouped: each KV head serves Hq/H
    query heads), mask [C, N]: where True, or (float) added to the scores; torch's fused kernel,
    which never holds the [Hq, C, N] scores. The mask is 2-D: given a 3-D one torch falls back
    to forming the scores (4-8x slower at 16K, and on one core mostly)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                          enable_gqa=True)[0]  # fmt: skip


# torch's fused CPU attention, returning each query's log-sum-exp of scores beside its output
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_split(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, k1: torch.Tensor,
                  v1: torch.Tensor, mask1: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`_attend` over keys k0 (seen whole by every query) then k1 (mask1 [C, N1]), as two
    fused passes merged by their log-sum-exps. The first, most of a long prompt's keys, takes
    no mask, and each KV head's query heads go in as one longer run of queries, so torch
    neither expands K and V per query head nor reads a mask: 1.5x the one masked pass at
    15K keys (0.109 vs 0.162 s a layer, a 512-token chunk, 2 threads), equal to 1e-7."""
    hq, c, d = q.shape
    h = k0.shape[0]
    r = hq // h
    o0, l0 = _FLASH(q.reshape(1, h, r * c, d), k0[None], v0[None])
    o0, l0 = o0.reshape(hq, c, d), l0.reshape(hq, c)
    bias = torch.zeros(mask1.shape).masked_fill_(~mask1, -math.inf)[None, None]
    o1, l1 = _FLASH(q[None], k1.repeat_interleave(r, 0)[None], v1.repeat_interleave(r, 0)[None],
                    attn_mask=bias)  # fmt: skip
    o1, l1 = o1[0], l1[0]
    top = torch.maximum(l0, l1)
    w0, w1 = (l0 - top).exp_()[..., None], (l1 - top).exp_()[..., None]
    return (o0 * w0 + o1 * w1) / (w0 + w1)


def select_pages_reference(cache: KVCache, layer: int, q: torch.Tensor, keep: int, first: int):
    """q: [Hq, D] → ([H, keep] int32 ascending page numbers among the q1 / 16 quantized pages,
    [H, r, q1 / 16] each query head's estimate of each page: the score one token standing for
    its 16 gets, or None without the cache's estimate_rest)."""
    pages, d = cache.qend(cache._n_next) // PAGE, q.shape[1]
    qg = q.reshape(cache.H, -1, d)
    if cache.cfg.page_summary == "keys":
        s = copy_scores(cache, layer, qg, pages * PAGE).unflatten(2, (pages, PAGE))  # H, r, P, 16
        each, est = s.amax(dim=3), s.mean(dim=3) / math.sqrt(d) + math.log(PAGE)
    else:
        each, est = page_scores(cache, layer, qg, pages), centre_estimates(cache, layer, qg, pages)
    est = est if cache.vcent.numel() else None
    if cache.cfg.page_score == "max":
        return top_pages(each.amax(dim=1), keep, first).int(), est
    return top_pages(attention_mass(each, first, d), keep, first).int(), est


def select_chunk_pages(cache: KVCache, q: torch.Tensor, keep: int, first: int,
                       k: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """A prefill chunk's pages among those of the keys k [H, pages·16, D] (as stored): [0,
    first), the last few (the text just before the chunk's window), and the rest of `keep` that
    would get the most attention from every SAMPLE-th query of the chunk, the last included, and
    each KV head's query heads (`attention_mass` of a page's best exact q . k: 1/SAMPLE of the
    chunk's dense score products, no exponentials per key). q: [Hq, C, D] → [H, keep]."""
    _, c, d = q.shape
    pages = k.shape[1] // PAGE
    sample = q[:, (c - 1) % SAMPLE :: SAMPLE].reshape(cache.H, -1, d)  # H, r·C/SAMPLE, D
    best = (sample @ k.transpose(1, 2)).unflatten(2, (pages, PAGE)).amax(dim=3)  # H, r·C/S, P
    mass = attention_mass(best, first, d)
    mass[:, pages - min(LOCAL, (keep - first) // 2) :] = math.inf
    return top_pages(mass, keep, first)


def page_scores(cache: KVCache, layer: int, qg: torch.Tensor, pages: int) -> torch.Tensor:
    """Each query's score of each of the first `pages` from their key summaries: q . c + |q * s|
    (L2 norm for meanstd summaries, L1 for minmax; "keys" is scored in `select_pages_reference`):
    qg [H, M, D] → [H, M, P]."""
    cent, spread = (t.float() for t in cache.page_summaries(layer, pages)[:2])  # H, P, D
    score = qg @ cent.transpose(1, 2)
    if cache.cfg.page_summary == "meanstd":
        return score + (qg.square() @ spread.square().transpose(1, 2)).sqrt_()
    return score + qg.abs() @ spread.transpose(1, 2)


def centre_estimates(cache: KVCache, layer: int, qg: torch.Tensor, pages: int) -> torch.Tensor:
    """Each query's estimate of each of the first `pages` from their key summaries' centre: the
    score of one token for 16, q . centre / sqrt(D) + ln 16. qg [H, M, D] → [H, M, P]."""
    cent = cache.page_summaries(layer, pages)[0].float()  # H, P, D
    return (qg @ cent.transpose(1, 2)) / math.sqrt(qg.shape[2]) + math.log(PAGE)


def score_channels(cache: KVCache, qg: torch.Tensor) -> torch.Tensor:
    """[H, D] bool: the channels of the keys' copy a KV head's queries qg [H, M, D] read, the
    cache's `score_channels` with the largest sum of |q| over them (ties: the lower channel)."""
    h, _, d = qg.shape
    n = cache.cfg.score_channels
    if not 0 < n < d:
        return torch.ones(h, d, dtype=torch.bool)
    weight = qg.abs().sum(dim=1)  # H, D
    order = torch.sort(weight, dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros(h, d, dtype=torch.bool).scatter_(1, order, True)


def copy_scores(cache: KVCache, layer: int, qg: torch.Tensor, n: int) -> torch.Tensor:
    """Each query's q . k over the keys' 4-bit copy of tokens [0, n) (kv.py "keys"), as the C++
    kernel computes it: on the `score_channels` channels, the others at their K group's mean.
    qg [H, M, D] → [H, M, n]."""
    g = cache.cfg.k_group
    keys = cache.key_copy(layer, n)  # H, n, D
    mean = cache.kcmu[layer, :, : n // g].float().repeat_interleave(g, dim=1)  # H, n, D
    read = score_channels(cache, qg)[:, None]  # H, 1, D
    return qg @ torch.where(read, keys, mean).transpose(1, 2)


def attention_mass(each: torch.Tensor, first: int, d: int) -> torch.Tensor:
    """[H, M, P] page scores of queries of head dim d → [H, P]: each query's softmax over the
    pages from `first` on, summed over the queries (the attention they would get; before
    `first`: 0)."""
    mass = torch.zeros_like(each[:, 0])
    mass[:, first:] = torch.softmax(each[:, :, first:] / math.sqrt(d), dim=-1).sum(dim=1)
    return mass


def top_pages(score: torch.Tensor, keep: int, first: int) -> torch.Tensor:
    """Pages [0, first) and the keep - first best-scoring after them, ascending: [H, keep]."""
    best = score[:, first:].topk(keep - first, dim=1).indices + first
    sink = torch.arange(first).expand(score.shape[0], first)
    return torch.cat([sink, best], dim=1).sort(dim=1).values


def page_tokens(pages: torch.Tensor) -> torch.Tensor:
    """[H, P] page numbers → [H, P·16] the token numbers they hold."""
    return (pages[:, :, None].long() * PAGE + torch.arange(PAGE)).reshape(pages.shape[0], -1)


def decode_reference(cache: KVCache, layer: int, q: torch.Tensor, kf, vf, pages=None, est=None):
    """q: [Hq, D] at position n; kf, vf: [H, M, D] buffer tokens [qend(n + 1), n + 1); pages:
    [H, P] the quantized pages each KV head reads (None: all); est: [H, r, q1 / 16] the score of
    each page not read as one token, its mean value (`select_pages_reference`; None: left out)."""
    hq, d = q.shape
    h = kf.shape[0]
    q1 = cache.qend(cache._n_next)
    kf, vf = kf[:, q1 - cache.qend(cache.n) :], vf[:, q1 - cache.qend(cache.n) :]  # H, n+1-q1, D
    tok = q1 if pages is None else page_tokens(pages)
    kq, vq = cache.dequant_kv(layer, tok)
    k = torch.cat([kq, kf], dim=1)  # H, N, D
    v = torch.cat([vq, vf], dim=1)
    s = (q.reshape(h, hq // h, d) @ k.transpose(1, 2)) / math.sqrt(d)  # H, r, N
    if pages is not None and est is not None:  # the pages not read, one estimate each
        rest = torch.ones(est.shape[0], est.shape[2], dtype=torch.bool)
        rest.scatter_(1, pages.long(), False)  # H, P
        s = torch.cat([s, est.masked_fill(~rest[:, None], -math.inf)], dim=2)  # H, r, N + P
        v = torch.cat([v, cache.page_summaries(layer, q1 // PAGE)[2]], dim=1)
    return (torch.softmax(s, dim=-1) @ v).reshape(hq, d)


def decode(
    cache: KVCache,
    layer: int,
    q: torch.Tensor,
    kf,
    vf,
    use_native: bool = True,
    keep: int = 0,
    first: int = 0,
) -> torch.Tensor:
    """Attention of one query [Hq, D]: over every cached token, or (keep > 0) over `keep`
    selected pages of the quantized ones and the fp16 buffer."""
    kernel = native.load() if use_native else None
    q1 = cache.qend(cache._n_next)
    pages = est = None
    t = cache.layer_tensors(layer)
    if keep:
        if kernel is None:
            pages, est = select_pages_reference(cache, layer, q, keep, first)
        else:
            cfg = cache.cfg
            flags = cfg.selection_flags  # as the fused C++ step reads them
            pages, est = kernel.select_pages(
                q.contiguous(), t[10], t[11], *t[16:20], q1 // PAGE, keep, first,
                bool(flags & 1), bool(flags & 2), cfg.k_group, cfg.score_channels,
                1.0 / math.sqrt(q.shape[1]), bool(t[12].numel()),
            )  # fmt: skip
    if kernel is None:
        return decode_reference(cache, layer, q, kf, vf, pages, est)
    cfg = cache.cfg
    cache.ensure(layer, pages)
    no_pages = torch.empty(0, dtype=torch.int32)
    return kernel.decode_attention(
        q.contiguous(), *t[:10], t[13], no_pages if pages is None else pages, t[14], t[15],
        torch.empty(0) if est is None else est, t[12],
        q1, cache._n_next - q1,
        cfg.k_bits, cfg.v_bits, cfg.k_group, cfg.v_group, 1.0 / math.sqrt(q.shape[1]),
    )  # fmt: skip
