"""Tiny mixture-of-experts GGUFs for tests: random weights in the block formats real files use,
a real tokenizer's metadata (copied from the test model), the tensor names and metadata keys
llama.cpp reads for each architecture. No small trained MoE is published as a package, so the
oracle is llama.cpp on the same file.

The scales are chosen so that a forward pass is well conditioned: unit-variance activations
through every block, router logits spread enough that top-k choices are rarely near ties, and
output logits peaked enough that most positions have a clear top-1.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from localai.engine.torch import native

# per architecture: qkv biases, Q/K norm ("head", "flat", None), a shared expert
ARCHS = {
    "qwen2moe": dict(bias=True, qk_norm=None, shared=True),
    "qwen3moe": dict(bias=False, qk_norm="head", shared=False),
    "olmoe": dict(bias=False, qk_norm="flat", shared=False),  # no GQA: K's norm is [E]
    "llama": dict(bias=False, qk_norm=None, shared=False),  # Mixtral: llama with experts
}


@functools.cache
def tokenizer_keys(src: Path) -> list[tuple]:
    """Every `tokenizer.*` key of `src` as (name, value, type, element type); read once (the
    reader parses each of the vocabulary's strings)."""
    keys = []
    for field in GGUFReader(src).fields.values():
        if field.name.startswith("tokenizer."):
            vtype = GGUFValueType(field.types[0])
            sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
            keys.append((field.name, field.contents(), vtype, sub))
    return keys


def build(path: Path, arch: str, tokenizer_src: Path, *, layers: int = 2, dim: int = 256,
          heads: int = 4, kv_heads: int = 2, experts: int = 8, used: int = 2, ffn: int = 256,
          shared_ffn: int = 512, seed: int = 0) -> Path:  # fmt: skip
    """Write a tiny `arch` MoE GGUF to `path`; dims are multiples of 256 (K-quant blocks)."""
    spec = ARCHS[arch]
    kernel = native.load()
    assert kernel is not None, native.status()
    gen = torch.Generator().manual_seed(seed)
    head_dim = dim // heads
    kv_heads = heads if spec["qk_norm"] == "flat" else kv_heads
    out = GGUFWriter(path, arch)
    out.add_block_count(layers)
    out.add_context_length(2048)
    out.add_embedding_length(dim)
    out.add_feed_forward_length(ffn)
    out.add_head_count(heads)
    out.add_head_count_kv(kv_heads)
    out.add_key_length(head_dim)
    out.add_value_length(head_dim)
    out.add_layer_norm_rms_eps(1e-6)
    out.add_rope_freq_base(10000.0)
    out.add_rope_dimension_count(head_dim)
    out.add_expert_count(experts)
    out.add_expert_used_count(used)
    if arch != "llama":
        out.add_expert_feed_forward_length(ffn)
    if spec["shared"]:
        out.add_expert_shared_feed_forward_length(shared_ffn)
    out.add_file_type(15)  # mostly Q4_K_M, as the tensors below
    for key in tokenizer_keys(tokenizer_src):
        out.add_key_value(*key)
    vocab = next(
        len(v) for k, v, *_ in tokenizer_keys(tokenizer_src) if k == "tokenizer.ggml.tokens"
    )

    def rand(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    def norm_w(n):  # RMSNorm weights near 1
        return 1 + rand(n, std=0.1)

    def add(name, x, qtype):
        x = x.float().contiguous()
        if qtype == Q.F32:
            out.add_tensor(name, x.numpy())
        elif qtype == Q.F16:
            out.add_tensor(name, x.half().numpy())
        else:
            rows = kernel.quantize(x.reshape(-1, x.shape[-1]), int(qtype))
            raw = rows.numpy().reshape(*x.shape[:-1], rows.shape[-1])
            out.add_tensor(name, raw, raw_dtype=qtype)

    s = dim**-0.5
    add("token_embd.weight", rand(vocab, dim, std=1.0), Q.Q8_0)
    add("output_norm.weight", norm_w(dim), Q.F32)
    add("output.weight", rand(vocab, dim, std=3 * s), Q.Q6_K)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", norm_w(dim), Q.F32)
        add(b + "attn_q.weight", rand(q_out, dim, std=s), Q.Q4_K)
        add(b + "attn_k.weight", rand(kv_out, dim, std=s), Q.Q4_K)
        add(b + "attn_v.weight", rand(kv_out, dim, std=s), Q.Q6_K)
        if spec["bias"]:
            for n, o in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                add(b + f"attn_{n}.bias", rand(o, std=0.1), Q.F32)
        if spec["qk_norm"]:
            qn, kn = (head_dim, head_dim) if spec["qk_norm"] == "head" else (q_out, kv_out)
            add(b + "attn_q_norm.weight", norm_w(qn), Q.F32)
            add(b + "attn_k_norm.weight", norm_w(kn), Q.F32)
        add(b + "attn_output.weight", rand(dim, q_out, std=0.5 * q_out**-0.5), Q.Q4_K)
        add(b + "ffn_norm.weight", norm_w(dim), Q.F32)
        add(b + "ffn_gate_inp.weight", rand(experts, dim, std=2 * s), Q.F32)
        add(b + "ffn_gate_exps.weight", rand(experts, ffn, dim, std=s), Q.Q4_K)
        add(b + "ffn_up_exps.weight", rand(experts, ffn, dim, std=s), Q.Q4_K)
        add(b + "ffn_down_exps.weight", rand(experts, dim, ffn, std=0.5 * ffn**-0.5), Q.Q6_K)
        if spec["shared"]:
            add(b + "ffn_gate_inp_shexp.weight", rand(dim, std=s), Q.F32)
            add(b + "ffn_gate_shexp.weight", rand(shared_ffn, dim, std=s), Q.Q8_0)
            add(b + "ffn_up_shexp.weight", rand(shared_ffn, dim, std=s), Q.Q8_0)
            add(b + "ffn_down_shexp.weight", rand(dim, shared_ffn, std=0.5 * shared_ffn**-0.5),
                Q.F16)  # fmt: skip
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return path
