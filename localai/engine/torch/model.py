"""Llama-family decoder blocks in flat torch: RMSNorm, RoPE, GQA attention over the paged KV
cache, and a per-layer FFN that is a replaceable module (dense SwiGLU today; the MoE work swaps
in a router + expert store per layer through `make_ffn`); the output head is another
(head.py, `make_head`).

Contract: `Transformer.forward(tokens)` runs the next `len(tokens)` positions of the sequence
held in `self.cache` and returns logits [C, V] (or only the last row). Weights stay in the GGUF's
block formats (weights.QLinear); activations are fp32, rounded to 8-bit blocks inside each
product as llama.cpp rounds them. Each half-block (Attention, DenseFFN) adds its output to the
residual stream itself. One-token steps go through the same half-blocks fused in C++
(native/decode.cpp), which tests hold to this Python definition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import attention
from .arch import Hparams
from .experts import ExpertCache
from .head import make_head
from .kv import PAGE, READ_AHEAD, KVCache, KVConfig
from .weights import GGUFWeights, QLinear

# C tokens in this forward, E model dim, Hq query heads, H KV heads, D head dim, F ffn dim,
# V vocabulary


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def swiglu(gate_up: QLinear, down: QLinear, h: torch.Tensor) -> torch.Tensor:
    """down(silu(gate h) · up h), gate and up one product: [N, E] → [N, E] (dense FFNs and
    each MoE expert)."""
    gu = gate_up(h)  # N, 2F
    f = gu.shape[1] // 2
    return down(F.silu(gu[:, :f]) * gu[:, f:])


def rope_tables(
    hp: Hparams, n: int, freq_factors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [n, rope_dims / 2] for positions 0..n-1.

    `freq_factors` (the GGUF's `rope_freqs.weight`, Llama 3.1 and later) divide each pair's
    frequency, as llama.cpp does.

    Linear scaling divides positions by the factor. YaRN interpolates the slow (long-wavelength)
    dims by the factor, keeps the fast ones, ramps between them by how many turns each dim
    makes over the original context, and scales cos/sin (so attention logits) to compensate,
    as llama.cpp computes it."""
    half = hp.rope_dims // 2
    i = torch.arange(half, dtype=torch.float64)  # the pair index
    inv = hp.rope_base ** (-i * 2 / hp.rope_dims)
    if freq_factors is not None:
        inv = inv / freq_factors.double()
    pos = torch.arange(n, dtype=torch.float64)
    mscale = 1.0
    if hp.rope_scaling == "yarn":
        lo, hi = yarn_corr_dims(hp)
        extrapolate = (1 - ((i - lo) / max(0.001, hi - lo)).clamp(0, 1)) * hp.yarn_ext_factor
        inv = inv / hp.rope_scale * (1 - extrapolate) + inv * extrapolate
        mscale = hp.yarn_attn_factor
        if hp.yarn_ext_factor != 0:
            mscale *= 1 + 0.1 * math.log(hp.rope_scale)
    elif hp.rope_scaling == "linear":
        pos = pos / hp.rope_scale
    ang = torch.outer(pos, inv)
    return (ang.cos() * mscale).float(), (ang.sin() * mscale).float()


def yarn_corr_dims(hp: Hparams) -> tuple[float, float]:
    """The pair indices where the ramp starts and ends: a dim turning `beta` times over the
    original context sits at index D·ln(ctx / (2π·beta)) / (2·ln base)."""

    def at(beta: float) -> float:
        d = hp.rope_dims
        return d * math.log(hp.rope_orig_ctx / (beta * 2 * math.pi)) / (2 * math.log(hp.rope_base))

    lo = max(0.0, math.floor(at(hp.yarn_beta_fast)))
    return lo, min(hp.rope_dims - 1.0, math.ceil(at(hp.yarn_beta_slow)))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x: [C, heads, D]; cos/sin: [C, rd/2]. Rotates the first rd dims, passes the rest."""
    rd = cos.shape[-1] * 2
    xr, xp = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # C, 1, rd/2
    if style == "norm":  # adjacent pairs (2i, 2i + 1)
        a, b = xr[..., 0::2], xr[..., 1::2]  # C, heads, rd/2
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:  # neox: dims i and i + rd/2
        a, b = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


class DenseFFN:
    """x + down(silu(gate h) · up h), h = rms_norm(x); gate and up fused into one product."""

    def __init__(self, w: GGUFWeights, hp: Hparams, i: int):
        self.norm, self.eps = w.dense(hp.name("ffn_norm", i)), hp.norm_eps
        self.gate_up = w.linear([hp.name("gate", i), hp.name("up", i)])
        self.down = w.linear(hp.name("down", i))
        kernel = w.kernel
        self.fused = kernel and kernel.DecodeDenseFFN(
            self.norm, self.eps, self.gate_up.native, self.down.native
        )  # the same step in C++, for one token (native/decode.cpp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + swiglu(self.gate_up, self.down, rms_norm(x, self.norm, self.eps))

    def step(self, x: torch.Tensor) -> None:
        """One token, x [1, E] updated in place (the fused step's contract)."""
        if self.fused:
            self.fused(x)
        else:
            x.copy_(self(x))

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def make_ffn(w: GGUFWeights, hp: Hparams, i: int, experts=None):
    """The FFN half of block i: dense SwiGLU, or routed experts (moe.py) from `experts`, a
    store (experts.py; default: in place from the memory map)."""
    if not hp.is_moe:
        return DenseFFN(w, hp, i)
    from .moe import MoEFFN

    return MoEFFN(w, hp, i, experts)


class Attention:
    """x + o(attend(rope(qkv(rms_norm(x))))) over the layer's KV cache."""

    def __init__(self, w: GGUFWeights, hp: Hparams, i: int):
        self.hp, self.layer = hp, i
        self.norm, self.eps = w.dense(hp.name("attn_norm", i)), hp.norm_eps
        self.qkv = w.linear([hp.name("q", i), hp.name("k", i), hp.name("v", i)])
        self.o = w.linear(hp.name("o", i))
        biases = [hp.name(k, i) for k in ("q_bias", "k_bias", "v_bias")]
        self.bias = torch.cat([w.dense(b) for b in biases]) if hp.spec.qkv_bias else None
        qk = hp.spec.qk_norm != "none"
        self.q_norm = w.dense(hp.name("q_norm", i)) if qk else None  # [D] or [Hq·D]
        self.k_norm = w.dense(hp.name("k_norm", i)) if qk else None
        self.fused = None  # the decode step in C++, once the cache exists (`fuse`)

    @property
    def fusable(self) -> bool:
        """Whether the C++ decode step computes this layer (it has no Q/K norm)."""
        return self.q_norm is None

    def fuse(self, kernel, cache: KVCache) -> None:
        """Bind the C++ decode step (native/decode.cpp) to this layer's cache tensors."""
        hp, cfg = self.hp, cache.cfg
        bias = self.bias if self.bias is not None else torch.empty(0)
        self.fused = kernel.DecodeAttention(
            self.norm, self.eps, self.qkv.native, bias, self.o.native, hp.n_heads,
            hp.n_kv_heads, hp.head_dim, hp.rope_dims, hp.spec.rope_style == "neox",
            cache.layer_tensors(self.layer),
            [cfg.k_bits, cfg.v_bits, cfg.k_group, cfg.v_group, cfg.selection_flags, self.layer,
             cfg.score_channels],
            cache.pages,
        )  # fmt: skip

    def __call__(self, x, cos, sin, cache: KVCache, use_native: bool, keep: int = 0,
                 first: int = 0) -> torch.Tensor:  # fmt: skip
        hp, c = self.hp, x.shape[0]
        hq, h, d = hp.n_heads, hp.n_kv_heads, hp.head_dim
        qkv = self.qkv(rms_norm(x, self.norm, self.eps))  # C, (Hq + 2H)·D
        if self.bias is not None:
            qkv = qkv + self.bias
        q, k = qkv[:, : hq * d], qkv[:, hq * d : (hq + h) * d]  # C, Hq·D; C, H·D
        if hp.spec.qk_norm == "flat":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q, k = q.reshape(c, hq, d), k.reshape(c, h, d)  # C, Hq, D; C, H, D
        if hp.spec.qk_norm == "head":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        v = qkv[:, (hq + h) * d :].view(c, h, d)  # C, H, D
        q = apply_rope(q, cos, sin, hp.spec.rope_style)
        k = apply_rope(k, cos, sin, hp.spec.rope_style)
        kf, vf = cache.write(self.layer, k.transpose(0, 1), v.transpose(0, 1))  # H, M, D
        if c == 1:
            o = attention.decode(cache, self.layer, q[0], kf, vf, use_native, keep, first)
            return x + self.o(o.reshape(1, hq * d))
        o = attention.prefill(cache, self.layer, q.transpose(0, 1), kf, vf, keep, first)
        return x + self.o(o.transpose(0, 1).reshape(c, hq * d))


class Block:
    def __init__(self, w: GGUFWeights, hp: Hparams, i: int, experts=None):
        self.attn = Attention(w, hp, i)
        self.ffn = make_ffn(w, hp, i, experts)


# a prompt's chunks attend densely in the first layers even past the attention budget (sparse
# prefill): their attention is broad, as Quest found (2 dense layers at 8K: perplexity on fresh
# text -0.4% of dense against +1.5% with none); with 6 at 16K dense decode finds 4 needles of
# 10 after it, with 2 it finds 1 (after a dense prefill: 6), for 4% more time (BENCHMARKS.md)
DENSE_PREFILL_LAYERS = 6


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's ops on n threads inside, as many as before after."""
    was = torch.get_num_threads()
    if n != was:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != was:
            torch.set_num_threads(was)


@dataclasses.dataclass
class AttnStats:
    """Decode steps and what their attention read (kv.KVCache.read_bytes)."""

    decode_steps: int = 0
    sparse_steps: int = 0  # steps that attended to selected pages only
    pages_selected: int = 0  # pages per KV head, summed over the sparse steps
    bytes_read: int = 0


class Transformer:
    def __init__(self, w: GGUFWeights, hp: Hparams, kv: KVConfig, capacity: int,
                 expert_budget: int | float | str | None = None,
                 expert_prefetch: bool = False, attn_budget: int = 0,
                 kv_ram: int | str | None = None, kv_dir: Path | None = None,
                 kv_read_ahead: int = READ_AHEAD, expert_policy: str = "freq"):  # fmt: skip
        """`expert_budget`: RAM for a MoE model's experts, read on demand (experts.ExpertCache;
        bytes or a share of all expert bytes, see experts.parse_budget); None keeps them all in
        place in the memory map. `expert_prefetch`: read each layer's likely experts while the
        layer before computes (moe.MoEFFN.predict). `attn_budget`: tokens a decode step attends
        to at most (sparse attention, see attention.py: the sink, the best pages, the fp16
        window); 0, or a context under the budget, is dense attention. `kv_ram`: RAM for the
        KV cache, its quantized pages beyond it on disk under `kv_dir` (kv.KVCache); None: all
        in RAM. `kv_read_ahead`: layers ahead whose KV pages are read back while one computes.
        `expert_policy`: which expert leaves the budget for another (routing.POLICIES)."""
        self.w, self.hp = w, hp
        self.attn_budget = attn_budget
        self.sparse_prefill = False  # prompts' chunks too (attention.select_chunk_pages)
        # threads for torch's ops in a prompt's chunk (its attention, 2/3 of a chunk at 16K);
        # a decode step's stay on the caller's one (TorchEngine._threads)
        self.threads = torch.get_num_threads()
        kv = self.kv_config(kv, attn_budget)
        self.attn_stats = AttnStats()
        self.expert_cache = None
        if hp.is_moe and expert_budget is not None:
            self.expert_cache = ExpertCache(w, hp, expert_budget, policy=expert_policy)
        cache = self.expert_cache
        self.blocks = [Block(w, hp, i, cache and cache.for_layer(i)) for i in range(hp.n_layers)]
        if cache is not None and expert_prefetch:
            for b, after in zip(self.blocks, self.blocks[1:], strict=False):
                b.ffn.next = after.ffn
        self.norm = w.dense(hp.name("output_norm"))
        self.head = make_head(w, hp)
        self.cache = KVCache(kv, hp.n_layers, hp.n_kv_heads, hp.head_dim, capacity, kv_ram,
                             kv_dir, kv_read_ahead)  # fmt: skip
        factors = w.dense("rope_freqs.weight") if "rope_freqs.weight" in w else None
        self.cos, self.sin = rope_tables(hp, self.cache.T, factors)
        # the C++ decode attention, and the fused C++ decode step; tests turn either off
        self.use_native = w.kernel is not None
        self.fused_decode = self.use_native and all(b.attn.fusable for b in self.blocks)
        if self.fused_decode:
            for b in self.blocks:
                b.attn.fuse(w.kernel, self.cache)

    @staticmethod
    def kv_config(kv: KVConfig, attn_budget: int) -> KVConfig:
        """The cache's layout: with an attention budget, pages are scored on the keys' 4-bit
        copy unless the layout names another summary."""
        if attn_budget and not kv.page_summary:
            return dataclasses.replace(kv, page_summary="keys")
        return kv

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """tokens: [C] ids at positions [n, n + C) → logits [C, V] (or [1, V], the last).

        Every position's logits are for scoring (perplexity, agreement tests): exact over the
        whole vocabulary, since a target may rank anywhere. The last position's are for
        choosing the next token: the two-pass head's, exact for the best candidates."""
        h = self.hidden(tokens, all_logits)  # C, E
        return self.head.exact_logits(h) if all_logits else self.head(h)  # C, V

    @torch.inference_mode()
    def hidden(self, tokens: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """The final normed states the head reads: [C, E] (or [1, E], the last)."""
        cache, c = self.cache, tokens.shape[0]
        n = cache.n
        cache.begin(c)
        cos, sin = self.cos[n : n + c], self.sin[n : n + c]  # C, rd/2
        x = self.w.rows(self.hp.name("embed"), tokens)  # C, E
        plan = keep, first = self._plan(n, c)
        if c == 1 and self.fused_decode and cache.qend(n + 1) == cache.qend(n):
            # one token whose K/V go to the fp16 buffer: the fused C++ step (decode.cpp)
            nq = cache.qend(n)
            for b in self.blocks:
                b.attn.fused(x, cos[0], sin[0], nq, n - nq, keep, first)
                b.ffn.step(x)
        else:
            with torch_threads(self.threads if c > 1 else torch.get_num_threads()):
                for i, b in enumerate(self.blocks):
                    layer_plan = (0, 0) if c > 1 and i < DENSE_PREFILL_LAYERS else plan
                    x = b.attn(x, cos, sin, cache, self.use_native, *layer_plan)
                    x = b.ffn(x)
        if c == 1:
            st = self.attn_stats
            st.decode_steps += 1
            st.sparse_steps += keep > 0
            st.pages_selected += keep
            st.bytes_read += cache.read_bytes(n + 1, keep)
        cache.commit(tokens.tolist())
        if not all_positions:
            x = x[-1:]
        return rms_norm(x, self.norm, self.hp.norm_eps)  # C, E

    def _plan(self, n: int, c: int) -> tuple[int, int]:
        """(pages per KV head, sink pages among them) that a forward of c tokens at n reads of
        the pages older than its window, under the attention budget (a prompt's chunks only with
        sparse_prefill); (0, 0): dense, as when every token fits the budget. A decode step's
        budget holds its window; a chunk's queries read the budget's pages besides the chunk
        and its window (a chunk's first query would otherwise see little of the text before
        it: at 8K and a 10% budget, 9 pages against 49)."""
        if not self.attn_budget or (c > 1 and not self.sparse_prefill):
            return 0, 0
        cache = self.cache
        q = cache.qend(n + 1) if c == 1 else cache.qend(n)  # a decode step's own K may move in
        first = max(1, cache.cfg.sink // PAGE)
        window = n + c - q if c == 1 else 0
        keep = max(first + 1, (self.attn_budget - window) // PAGE)
        return (keep, first) if keep < q // PAGE else (0, 0)

    @property
    def weight_bytes(self) -> int:
        total = self.head.nbytes
        for b in self.blocks:
            total += b.attn.qkv.nbytes + b.attn.o.nbytes + b.ffn.nbytes
        return total
