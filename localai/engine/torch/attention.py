"""Attention over the paged KV cache: a chunk of queries (prefill) and one query (decode).

Both read keys older than each query's window through their quantized values (see kv.py), so
the result does not depend on how a prompt was chunked. Decode goes to the fused C++ kernel
(native/kv_attention.cpp: unpack, scores, softmax and the V sum in one pass over the pages) when
it built, else to `decode_reference`, the pure-torch definition it is tested against.

Sparse decode (`keep` > 0): each KV head attends to `keep` pages of 16 quantized tokens, the
first `first` (the attention sink) and the rest chosen by `select_pages` from the per-page key
summaries (kv.py: a centre c and spread s per channel), plus the whole fp16 buffer (the recent
window). A page scores q . c + |q * s|: with "minmax" summaries (c, s the middle and half-width
of the keys' range) the L1 norm, which makes it the largest q . k any key in the page's box can
give; with "meanstd" (mean, standard deviation) the L2 norm, the mean score plus one standard
deviation. A KV head (its query heads share its pages) combines its query heads' scores as
attention ("mass": each head's softmax over the pages, summed) or by their maximum ("max").
Prefill stays dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import native
from .kv import PAGE, KVCache

# Hq query heads, H KV heads, r = Hq / H, C query tokens, N keys, D head dim


def prefill(cache: KVCache, layer: int, q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor,
            keep: int = 0, first: int = 0):  # fmt: skip
    """q: [Hq, C, D] for positions [n, n + C); kf, vf: [H, M, D] fp16-exact keys/values of tokens
    [qend(n), n + C) from `cache.write`. Returns [Hq, C, D]. With `keep` (sparse prefill) the
    chunk reads, of the pages older than its window, the first `first` and the `keep` - `first`
    that `select_chunk_pages` finds the chunk attends to most."""
    hq, c, d = q.shape
    h = kf.shape[0]
    n, n2 = cache.n, cache._n_next
    q0, q1 = cache.qend(n), cache.qend(n2)
    qg = q.reshape(h, (hq // h) * c, d)  # H, r·C, D
    pos = torch.arange(n, n2)  # C
    keys = torch.arange(q0, n2)  # M
    # fp keys are visible when causal and not yet quantized for this query: j >= qend(p + 1)
    bound = torch.tensor([cache.qend(int(p) + 1) for p in pos])  # C
    full_ok = (keys[None, :] <= pos[:, None]) & (keys[None, :] >= bound[:, None])  # C, M
    if q1 == 0:
        return _attend(q, kf, vf, full_ok)
    if keep:  # the chosen pages, and those quantized in this forward (inside its window)
        old = select_chunk_pages(cache, layer, qg, keep, first, q0 // PAGE)
        tok = page_tokens(torch.cat([old, torch.arange(q0 // PAGE, q1 // PAGE).expand(h, -1)], 1))
    else:
        tok = torch.arange(q1)[None, :]
    which = tok if keep else q1  # all of [0, q1): a slice, cheaper than a gather
    kq, vq = cache.dequant_kv(layer, which)  # H, q1', D
    q_ok = tok[:, None, :] < bound[None, :, None]  # H or 1, C, q1'
    ok = torch.cat([q_ok, full_ok.expand(q_ok.shape[0], -1, -1)], dim=-1)  # H or 1, C, q1' + M
    if keep:  # a mask per KV head, for each of its query heads
        ok = ok.repeat_interleave(hq // h, dim=0)
    return _attend(q, torch.cat([kq, kf], dim=1), torch.cat([vq, vf], dim=1), ok)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [Hq, C, D] over k, v [H, N, D] (grouped: each KV head serves Hq/H
    query heads), where ok ([C, N], or [Hq, C, N]) allows it; torch's fused kernel, which never
    holds the [Hq, C, N] scores (2-3x the speed of forming them at 8K)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=ok,
                                          enable_gqa=True)[0]  # fmt: skip


def select_pages_reference(cache: KVCache, layer: int, q: torch.Tensor, keep: int, first: int):
    """q: [Hq, D] → [H, keep] int32 ascending page numbers among the q1 / 16 quantized pages."""
    pages = cache.qend(cache._n_next) // PAGE
    each = page_scores(cache, layer, q.reshape(cache.H, -1, q.shape[1]), pages)  # H, r, P
    if cache.cfg.page_score == "max":
        return top_pages(each.amax(dim=1), keep, first).int()
    return top_pages(attention_mass(each, first, q.shape[1]), keep, first).int()


def select_chunk_pages(cache: KVCache, layer: int, qg: torch.Tensor, keep: int, first: int,
                       pages: int) -> torch.Tensor:  # fmt: skip
    """A prefill chunk's pages among the first `pages`: [0, first), then the keep - first with the
    most estimated attention (`attention_mass` over the chunk's queries and the KV head's query
    heads). qg: [H, r·C, D]."""
    mass = attention_mass(page_scores(cache, layer, qg, pages), first, qg.shape[2])
    return top_pages(mass, keep, first)


def page_scores(cache: KVCache, layer: int, qg: torch.Tensor, pages: int) -> torch.Tensor:
    """Each query's score q . c + |q * s| of each of the first `pages` (L2 norm for meanstd
    summaries, L1 for minmax): qg [H, M, D] → [H, M, P]."""
    cent, spread = (t.float() for t in cache.page_summaries(layer, pages))  # H, P, D
    score = qg @ cent.transpose(1, 2)
    if cache.cfg.page_summary == "meanstd":
        return score + (qg.square() @ spread.square().transpose(1, 2)).sqrt_()
    return score + qg.abs() @ spread.transpose(1, 2)


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


def decode_reference(cache: KVCache, layer: int, q: torch.Tensor, kf, vf, pages=None):
    """q: [Hq, D] at position n; kf, vf: [H, M, D] buffer tokens [qend(n + 1), n + 1); pages:
    [H, P] the quantized pages each KV head reads (None: all)."""
    hq, d = q.shape
    h = kf.shape[0]
    q1 = cache.qend(cache._n_next)
    kf, vf = kf[:, q1 - cache.qend(cache.n) :], vf[:, q1 - cache.qend(cache.n) :]  # H, n+1-q1, D
    tok = q1 if pages is None else page_tokens(pages)
    kq, vq = cache.dequant_kv(layer, tok)
    k = torch.cat([kq, kf], dim=1)  # H, N, D
    v = torch.cat([vq, vf], dim=1)
    s = (q.reshape(h, hq // h, d) @ k.transpose(1, 2)) / math.sqrt(d)  # H, r, N
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
    pages = None
    if keep:
        if kernel is None:
            pages = select_pages_reference(cache, layer, q, keep, first)
        else:
            flags = cache.cfg.selection_flags  # as the fused C++ step reads them
            pages = kernel.select_pages(
                q.contiguous(), cache.kcent[layer], cache.kspread[layer], q1 // PAGE, keep, first,
                bool(flags & 1), bool(flags & 2),
            )  # fmt: skip
    if kernel is None:
        return decode_reference(cache, layer, q, kf, vf, pages)
    cfg, t = cache.cfg, cache.layer_tensors(layer)
    cache.ensure(layer, pages)
    no_pages = torch.empty(0, dtype=torch.int32)
    return kernel.decode_attention(
        q.contiguous(), *t[:10], t[12], no_pages if pages is None else pages, t[13], t[14],
        q1, cache._n_next - q1,
        cfg.k_bits, cfg.v_bits, cfg.k_group, cfg.v_group, 1.0 / math.sqrt(q.shape[1]),
    )  # fmt: skip
