"""Architectures as data: hyperparameters and tensor names read from GGUF metadata.

A new dense or MoE architecture is one `ARCHS` entry, not a new model file: the entry says how
RoPE pairs dimensions, whether Q/K/V carry biases, and which tensor names a block uses (MoE
entries add the router `ffn_gate_inp` and the stacked `ffn_*_exps` names, which the FFN factory
in model.py picks up). `Hparams.from_metadata` validates what the model code relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import EngineError


@dataclass(frozen=True)
class ArchSpec:
    # llama.cpp's two RoPE layouts: "norm" rotates adjacent pairs (the GGUF converter permutes
    # llama's Q/K rows for it), "neox" rotates the first half against the second half.
    rope_style: str = "norm"
    qkv_bias: bool = False
    # "dense" (SwiGLU); "moe" (router + stacked experts); "auto": MoE when the GGUF names
    # experts (`expert_count`, Mixtral-style llama), dense otherwise
    ffn: str = "dense"
    tensors: dict[str, str] = field(default_factory=dict)
    # RMSNorm of Q and K before RoPE: "head" (one [D] weight per head: Qwen3), "flat" (over all
    # heads at once, a [Hq·D] weight: OLMoE), or "none"
    qk_norm: str = "none"
    # MoE routing as llama.cpp does it per arch: softmax over all experts, top-k, then the k
    # weights renormalised to sum to 1 (`norm_topk`) or used as they are
    norm_topk: bool = False
    shared_expert: bool = False  # Qwen2-MoE: a dense expert every token uses, sigmoid-gated


# Per-block names use {i} for the block index; llama.cpp's names for all of these archs.
DENSE_TENSORS = {
    "embed": "token_embd.weight",
    "output": "output.weight",  # absent when tied to the embedding
    "output_norm": "output_norm.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "o": "blk.{i}.attn_output.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}
MOE_TENSORS = DENSE_TENSORS | {
    "router": "blk.{i}.ffn_gate_inp.weight",
    "gate_exps": "blk.{i}.ffn_gate_exps.weight",
    "up_exps": "blk.{i}.ffn_up_exps.weight",
    "down_exps": "blk.{i}.ffn_down_exps.weight",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "shared_router": "blk.{i}.ffn_gate_inp_shexp.weight",
    "shared_gate": "blk.{i}.ffn_gate_shexp.weight",
    "shared_up": "blk.{i}.ffn_up_shexp.weight",
    "shared_down": "blk.{i}.ffn_down_shexp.weight",
}

ARCHS: dict[str, ArchSpec] = {
    # Llama, and Mixtral (a llama whose GGUF has experts: top-k weights renormalised)
    "llama": ArchSpec("norm", False, "auto", MOE_TENSORS, norm_topk=True),
    "qwen2": ArchSpec("neox", True, "dense", DENSE_TENSORS),
    "qwen2moe": ArchSpec("neox", True, "moe", MOE_TENSORS, shared_expert=True),
    "qwen3moe": ArchSpec("neox", False, "moe", MOE_TENSORS, qk_norm="head", norm_topk=True),
    "olmoe": ArchSpec("neox", False, "moe", MOE_TENSORS, qk_norm="flat"),
}


@dataclass(frozen=True)
class Hparams:
    arch: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dims: int
    rope_scale: float  # the context extension factor (linear: positions are divided by it)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_dim: int = 0  # one expert's hidden size
    shared_ffn_dim: int = 0  # Qwen2-MoE's shared expert
    rope_scaling: str = "none"  # "none", "linear" or "yarn"
    rope_orig_ctx: int = 0  # YaRN: the context the model was trained with
    yarn_ext_factor: float = 1.0  # YaRN: how much of the ramp between the two regimes to apply
    yarn_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0  # rotations over the original context above which a dim
    yarn_beta_slow: float = 1.0  # extrapolates, below which it interpolates

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    @property
    def is_moe(self) -> bool:
        ffn = self.spec.ffn
        return ffn == "moe" or (ffn == "auto" and self.n_experts > 0)

    def name(self, key: str, layer: int | None = None) -> str:
        return self.spec.tensors[key].format(i=layer)

    @classmethod
    def from_metadata(cls, md: dict, vocab_size: int) -> Hparams:
        arch = md.get("general.architecture", "llama")
        if arch not in ARCHS:
            raise EngineError(
                f"the torch runner does not know the {arch!r} architecture "
                f"(known: {', '.join(sorted(ARCHS))}); use --engine llama"
            )

        def get(key, default=None):
            v = md.get(f"{arch}.{key}", default)
            if v is None:
                raise EngineError(f"GGUF metadata lacks {arch}.{key}")
            return v

        dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", dim // heads))
        scaling = md.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear", "yarn"):
            raise EngineError(f"RoPE scaling {scaling!r} is not supported by the torch runner yet")
        factor = float(md.get(f"{arch}.rope.scaling.factor", 0.0) or 1.0)
        factor = 1.0 if scaling == "none" else factor
        ctx = int(get("context_length"))
        orig = int(md.get(f"{arch}.rope.scaling.original_context_length", 0) or ctx)
        if scaling == "yarn":  # the model is meant to run up to orig × factor
            ctx = max(ctx, int(orig * factor))
        hp = cls(
            arch=arch,
            n_layers=int(get("block_count")),
            dim=dim,
            ffn_dim=int(get("feed_forward_length", get("expert_feed_forward_length", 0))),
            n_heads=heads,
            n_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            vocab_size=vocab_size,
            context_length=ctx,
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dims=int(get("rope.dimension_count", head_dim)),
            rope_scale=factor,
            n_experts=int(get("expert_count", 0)),
            n_experts_used=int(get("expert_used_count", 0)),
            expert_ffn_dim=int(get("expert_feed_forward_length", 0)),
            shared_ffn_dim=int(get("expert_shared_feed_forward_length", 0)),
            rope_scaling=scaling,
            rope_orig_ctx=orig,
            yarn_attn_factor=float(md.get(f"{arch}.rope.scaling.attn_factor", 1.0) or 1.0),
        )
        if hp.is_moe and not 0 < hp.n_experts_used <= hp.n_experts:
            raise EngineError(f"{arch}: {hp.n_experts_used} of {hp.n_experts} experts per token")
        assert hp.n_heads % hp.n_kv_heads == 0, "GQA needs whole query groups per KV head"
        assert hp.rope_dims <= hp.head_dim and hp.rope_dims % 2 == 0
        return hp
