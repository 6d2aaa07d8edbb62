"""Attention over the paged KV cache: a chunk of queries (prefill) and one query (decode).

Both read keys older than each query's window through their quantized values (see kv.py), so
the result does not depend on how a prompt was chunked. Decode goes to the fused C++ kernel
(native/kv_attention.cpp: unpack, scores, softmax and the V sum in one pass over the pages) when
it built, else to `decode_reference`, the pure-torch definition it is tested against.
"""

from __future__ import annotations

import math

import torch

from . import native
from .kv import KVCache

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


def decode_reference(cache: KVCache, layer: int, q: torch.Tensor, kf, vf) -> torch.Tensor:
    """q: [Hq, D] at position n; kf, vf: [H, M, D] buffer tokens [qend(n + 1), n + 1)."""
    hq, d = q.shape
    h = kf.shape[0]
    q1 = cache.qend(cache._n_next)
    kf, vf = kf[:, q1 - cache.qend(cache.n) :], vf[:, q1 - cache.qend(cache.n) :]  # H, n+1-q1, D
    k = torch.cat([cache.dequant_k(layer, q1), kf], dim=1)  # H, N, D
    v = torch.cat([cache.dequant_v(layer, q1), vf], dim=1)
    s = (q.reshape(h, hq // h, d) @ k.transpose(1, 2)) / math.sqrt(d)  # H, r, N
    return (torch.softmax(s, dim=-1) @ v).reshape(hq, d)


def decode(cache: KVCache, layer: int, q: torch.Tensor, kf, vf, use_native: bool = True):
    kernel = native.load() if use_native else None
    if kernel is None:
        return decode_reference(cache, layer, q, kf, vf)
    cfg = cache.cfg
    return kernel.decode_attention(
        q.contiguous(),
        *cache.layer_tensors(layer),
        cache.qend(cache._n_next), cache._n_next - cache.qend(cache._n_next),
        cfg.k_bits, cfg.v_bits, cfg.k_group, cfg.v_group, 1.0 / math.sqrt(q.shape[1]),
    )  # fmt: skip
