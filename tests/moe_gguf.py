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

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as Q

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
          shared_ffn: int = 512, seed: int = 0, expert_type: Q = Q.Q4_K,
          expert_rows=None) -> Path:  # fmt: skip
    """Write a tiny `arch` MoE GGUF to `path`; dims are multiples of 256 (K-quant blocks).

    The file is written one tensor at a time, so a shape-faithful file of many GB (bench/moe.py)
    never sits in memory. `expert_rows(qtype, rows, cols, std)`, if given, makes the stacked
    expert tensors' raw rows (e.g. drawn from a pool quantized once: random rows are random
    rows, and quantizing billions of them would take hours)."""
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

    def quantized(shape, std, qtype):  # random rows in `qtype`: raw bytes, or floats
        x = (torch.randn(*shape, generator=gen) * std).contiguous()
        if qtype == Q.F32:
            return x.numpy()
        if qtype == Q.F16:
            return x.half().numpy()
        rows = kernel.quantize(x.reshape(-1, x.shape[-1]), int(qtype))
        return rows.numpy().reshape(*x.shape[:-1], rows.shape[-1])

    plan = []  # (name, shape, qtype, make raw data); written after the header, in order

    def add(name, shape, std, qtype, mean=0.0):
        def make():
            if expert_rows is not None and "_exps." in name:
                raw = expert_rows(qtype, shape[0] * shape[1], shape[2], std)
                return raw.reshape(shape[0], shape[1], -1)
            raw = quantized(shape, std, qtype)
            return raw + np.float32(mean) if mean else raw

        plan.append((name, shape, qtype, make))

    def norm_w(name, n):  # RMSNorm weights near 1
        add(name, (n,), 0.1, Q.F32, mean=1.0)

    s = dim**-0.5
    add("token_embd.weight", (vocab, dim), 1.0, Q.Q8_0)
    norm_w("output_norm.weight", dim)
    add("output.weight", (vocab, dim), 3 * s, Q.Q6_K)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        b = f"blk.{i}."
        norm_w(b + "attn_norm.weight", dim)
        add(b + "attn_q.weight", (q_out, dim), s, Q.Q4_K)
        add(b + "attn_k.weight", (kv_out, dim), s, Q.Q4_K)
        add(b + "attn_v.weight", (kv_out, dim), s, Q.Q6_K)
        if spec["bias"]:
            for n, o in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                add(b + f"attn_{n}.bias", (o,), 0.1, Q.F32)
        if spec["qk_norm"]:
            qn, kn = (head_dim, head_dim) if spec["qk_norm"] == "head" else (q_out, kv_out)
            norm_w(b + "attn_q_norm.weight", qn)
            norm_w(b + "attn_k_norm.weight", kn)
        add(b + "attn_output.weight", (dim, q_out), 0.5 * q_out**-0.5, Q.Q4_K)
        norm_w(b + "ffn_norm.weight", dim)
        add(b + "ffn_gate_inp.weight", (experts, dim), 2 * s, Q.F32)
        add(b + "ffn_gate_exps.weight", (experts, ffn, dim), s, expert_type)
        add(b + "ffn_up_exps.weight", (experts, ffn, dim), s, expert_type)
        add(b + "ffn_down_exps.weight", (experts, dim, ffn), 0.5 * ffn**-0.5, Q.Q6_K)
        if spec["shared"]:
            add(b + "ffn_gate_inp_shexp.weight", (dim,), s, Q.F32)
            add(b + "ffn_gate_shexp.weight", (shared_ffn, dim), s, Q.Q8_0)
            add(b + "ffn_up_shexp.weight", (shared_ffn, dim), s, Q.Q8_0)
            add(b + "ffn_down_shexp.weight", (dim, shared_ffn), 0.5 * shared_ffn**-0.5, Q.F16)
    for name, shape, qtype, _ in plan:
        if qtype in (Q.F32, Q.F16):
            dtype = np.float32 if qtype == Q.F32 else np.float16
            out.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * dtype().nbytes)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            raw_shape = (*shape[:-1], shape[-1] // block * size)
            out.add_tensor_info(name, raw_shape, np.dtype(np.uint8), int(np.prod(raw_shape)),
                                raw_dtype=qtype)  # fmt: skip
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_ti_data_to_file()
    for *_, make in plan:
        out.write_tensor_data(np.ascontiguousarray(make()))
    out.close()
    return path
