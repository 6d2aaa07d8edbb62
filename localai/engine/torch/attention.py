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
deviation. A KV head takes the maximum over its query heads (a GQA group shares its pages).
Prefill stays dense.
"""

from __future__ import annotations

import math

import torch

from . import native
from .kv import PAGE, KVCache

# Hq query heads, H KV heads, r = Hq / H, C query tokens, N keys, D head dim


def prefill(cache: KVCache, layer: int, q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor):
    """q: [Hq, C, D] for positions [n, n + C); kf, vf: [H, M, D] fp16-exact keys/values of tokens
    [qend(n), n + C) from `cache.write`. Returns [Hq, C, D]."""
    hq, c, d = q.shape
    h = kf.shape[0]
    n, n2 = cache.n, cache._n_next
    q0, q1 = cache.qend(n), cache.qend(n2)
    qg = q.reshape(h, (hq // h) * c, d)  # H, r·C, D
    pos = torch.arange(n, n2)  # C
    keys = torch.arange(q0, n2)  # M
    scale = 1.0 / math.sqrt(d)
    s_full = (qg @ kf.transpose(1, 2)).mul_(scale).reshape(h, hq // h, c, -1)  # H, r, C, M
    # fp keys are visible when causal and not yet quantized for this query: j >= qend(p + 1)
    bound = torch.tensor([cache.qend(int(p) + 1) for p in pos])  # C
    full_ok = (keys[None, :] <= pos[:, None]) & (keys[None, :] >= bound[:, None])  # C, M
    s_full.masked_fill_(~full_ok, float("-inf"))
    if q1 == 0:
        p = torch.softmax(s_full, dim=-1)
        return (p.reshape(h, -1, kf.shape[1]) @ vf).reshape(hq, c, d)
    kq, vq = cache.dequant_k(layer, q1), cache.dequant_v(layer, q1)  # H, q1, D
    s_q = (qg @ kq.transpose(1, 2)).mul_(scale).reshape(h, hq // h, c, q1)  # H, r, C, q1
    q_ok = torch.arange(q1)[None, :] < bound[:, None]  # C, q1
    s_q.masked_fill_(~q_ok, float("-inf"))
    p = torch.softmax(torch.cat([s_q, s_full], dim=-1), dim=-1)  # H, r, C, q1 + M
    out = p[..., :q1].reshape(h, -1, q1) @ vq + p[..., q1:].reshape(h, -1, kf.shape[1]) @ vf
    return out.reshape(hq, c, d)


def select_pages_reference(cache: KVCache, layer: int, q: torch.Tensor, keep: int, first: int):
    """q: [Hq, D] → [H, keep] int32 ascending page numbers among the q1 / 16 quantized pages."""
    pages = cache.qend(cache._n_next) // PAGE
    cent, spread = (t.float() for t in cache.page_summaries(layer, pages))  # H, P, D
    qg = q.reshape(cent.shape[0], -1, 1, q.shape[1])  # H, r, 1, D
    qs = qg * spread[:, None]  # H, r, P, D
    norm = qs.norm(dim=-1) if cache.cfg.page_summary == "meanstd" else qs.abs().sum(-1)
    score = ((qg * cent[:, None]).sum(-1) + norm).amax(dim=1)  # H, P
    best = score[:, first:].topk(keep - first, dim=1).indices + first
    sink = torch.arange(first).expand(cent.shape[0], first)
    return torch.cat([sink, best], dim=1).sort(dim=1).values.int()


def _gather_pages(x: torch.Tensor, pages: torch.Tensor | None) -> torch.Tensor:
    """x: [H, q1, D] → the tokens of each head's pages [H, P·16, D] (all of x without pages)."""
    if pages is None:
        return x
    tok = (pages[:, :, None].long() * PAGE + torch.arange(PAGE)).reshape(x.shape[0], -1)
    return x.gather(1, tok[:, :, None].expand(-1, -1, x.shape[2]))


def decode_reference(cache: KVCache, layer: int, q: torch.Tensor, kf, vf, pages=None):
    """q: [Hq, D] at position n; kf, vf: [H, M, D] buffer tokens [qend(n + 1), n + 1); pages:
    [H, P] the quantized pages each KV head reads (None: all)."""
    hq, d = q.shape
    h = kf.shape[0]
    q1 = cache.qend(cache._n_next)
    kf, vf = kf[:, q1 - cache.qend(cache.n) :], vf[:, q1 - cache.qend(cache.n) :]  # H, n+1-q1, D
    k = torch.cat([_gather_pages(cache.dequant_k(layer, q1), pages), kf], dim=1)  # H, N, D
    v = torch.cat([_gather_pages(cache.dequant_v(layer, q1), pages), vf], dim=1)
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
            l2 = cache.cfg.page_summary == "meanstd"
            cent, spread = cache.kcent[layer], cache.kspread[layer]
            pages = kernel.select_pages(q.contiguous(), cent, spread, q1 // PAGE, keep, first, l2)
    if kernel is None:
        return decode_reference(cache, layer, q, kf, vf, pages)
    cfg, t = cache.cfg, cache.layer_tensors(layer)
    no_pages = torch.empty(0, dtype=torch.int32)
    return kernel.decode_attention(
        q.contiguous(), *t[:10], t[12], no_pages if pages is None else pages,
        q1, cache._n_next - q1,
        cfg.k_bits, cfg.v_bits, cfg.k_group, cfg.v_group, 1.0 / math.sqrt(q.shape[1]),
    )  # fmt: skip
