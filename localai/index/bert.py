"""MiniLM-L6-v2 (a 6-layer BERT) in plain torch: the embedder's torch backends.

The weights are the model's own fp32 safetensors, read directly (no framework). The forward
runs in bfloat16 on a CPU with AMX or AVX512-BF16 (oneDNN multiplies bf16 ~5x faster than fp32
there), in fp32 elsewhere.
Bias, GELU and the residual add are fused into the matmul (`torch.ops.mkldnn._linear_pointwise`,
the op torch's own compiler emits for CPU linears), which saves one pass over the activations
each; attention is torch's fused SDPA, row by row (see `attention`). `fused=False` runs the same
math with plain torch ops: the reference the parity tests compare against, and the path taken
when the fused op is missing. LayerNorm and the mean-pool accumulate in fp32.

Contract: `encode(ids, mask)` → (B, C) float32, the mean over unmasked tokens of the last hidden
state (not normalised); padded positions never change an unpadded row.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# B batch, T tokens, H heads, D head dim, C channels (H*D = 384), F feed-forward width (1536)
HEADS = 12
EPS = 1e-12
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def bf16_is_native() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX or AVX512-BF16) and oneDNN may use it;
    elsewhere oneDNN emulates bf16 and fp32 is faster. A run capped to AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2 or ATEN_CPU_CAPABILITY=avx2, as on a laptop) reports it absent."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if isa == "AVX" or isa.startswith(("SSE", "AVX2")) or aten in ("avx2", "default"):
        return False
    cpu = torch.cpu
    return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """name → tensor from a .safetensors file (8-byte header length, JSON header, raw data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())  # writable, so the tensors can share it without a copy
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        dt = np.dtype(_DTYPES[t["dtype"]])
        arr = np.frombuffer(data, dtype=dt, count=(b - a) // dt.itemsize, offset=a)
        out[name] = torch.from_numpy(arr.reshape(t["shape"]))
    return out


def _has_fused() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


class MiniLM:
    def __init__(self, weights: dict[str, torch.Tensor], dtype=torch.bfloat16, fused=True):
        self.dtype = dtype
        self.fused = fused and _has_fused()
        w = weights
        # copies, so that no tensor keeps the file's whole buffer (90 MB) alive
        own = {k: v.to(torch.float32, copy=True) for k, v in w.items() if k.startswith("emb")}
        self.word = own["embeddings.word_embeddings.weight"]  # (V, C)
        self.pos = own["embeddings.position_embeddings.weight"]  # (P, C)
        self.type0 = own["embeddings.token_type_embeddings.weight"][0]  # (C,)
        self.emb_ln = (own["embeddings.LayerNorm.weight"], own["embeddings.LayerNorm.bias"])
        self.max_tokens = self.pos.shape[0]
        self.layers = []
        n = 0
        while f"encoder.layer.{n}.output.dense.weight" in w:
            n += 1
        for i in range(n):
            p = f"encoder.layer.{i}."

            def g(name, p=p):
                return w[p + name].to(dtype, copy=True)

            qkv = [f"attention.self.{x}" for x in ("query", "key", "value")]
            ln1 = "attention.output.LayerNorm"
            self.layers.append({
                "qkv_w": torch.cat([g(x + ".weight") for x in qkv]),  # (3C, C)
                "qkv_b": torch.cat([g(x + ".bias") for x in qkv]),  # (3C,)
                "o_w": g("attention.output.dense.weight"), "o_b": g("attention.output.dense.bias"),
                "ln1": (g(ln1 + ".weight"), g(ln1 + ".bias")),
                "up_w": g("intermediate.dense.weight"), "up_b": g("intermediate.dense.bias"),
                "down_w": g("output.dense.weight"), "down_b": g("output.dense.bias"),
                "ln2": (g("output.LayerNorm.weight"), g("output.LayerNorm.bias")),
            })  # fmt: skip

    @classmethod
    def load(cls, path: Path, **kw) -> MiniLM:
        return cls(read_safetensors(path), **kw)

    def _linear(self, x, w, b, act: str = "", residual=None):
        """x @ w.T + b, then GELU (act="gelu") or + residual; one oneDNN call when fused."""
        if self.fused:
            lp = torch.ops.mkldnn._linear_pointwise
            if residual is not None:
                return lp.binary(x, residual, w, b, "add")
            return lp(x, w, b, act or "none", [], "none" if act == "gelu" else "")
        y = F.linear(x, w, b)
        if act == "gelu":
            y = F.gelu(y)
        return y if residual is None else y + residual

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, T) int64 → (B, C) float32 mean of the last hidden state over mask."""
        B, T = ids.shape
        C = self.word.shape[1]
        H, D = HEADS, C // HEADS
        x = self.word[ids] + self.pos[:T] + self.type0  # (B, T, C) fp32
        x = F.layer_norm(x, (C,), *self.emb_ln, eps=EPS).to(self.dtype).view(B * T, C)
        lens = mask.sum(dim=1).tolist()  # tokens of each row; the rest is padding
        for L in self.layers:
            qkv = self._linear(x, L["qkv_w"], L["qkv_b"])  # (B*T, 3C)
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, D)
            a = attention(q, k, v, lens)  # (B, H, T, D)
            a = a.transpose(1, 2).reshape(B * T, C)
            x = self._linear(a, L["o_w"], L["o_b"], residual=x)  # (B*T, C)
            x = F.layer_norm(x, (C,), *L["ln1"], eps=EPS)
            h = self._linear(x, L["up_w"], L["up_b"], act="gelu")  # (B*T, F)
            x = self._linear(h, L["down_w"], L["down_b"], residual=x)  # (B*T, C)
            x = F.layer_norm(x, (C,), *L["ln2"], eps=EPS)
        m = mask.to(torch.float32)[..., None]  # (B, T, 1)
        summed = (x.view(B, T, C).float() * m).sum(dim=1)  # (B, C)
        return summed / m.sum(dim=1).clamp(min=1.0)


def attention(q, k, v, lens: list[int]):
    """Softmax attention of each row over its own tokens; (B, H, T, D) → (B, H, T, D).

    Row by row without a mask rather than the batch with one: the fused kernel is ~25% faster
    unmasked, and a row's padding is never computed. Padded positions come out as zeros."""
    if min(lens) == q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_zeros(q.shape)
    for i, n in enumerate(lens):
        s = (slice(i, i + 1), slice(None), slice(0, n))
        out[s] = F.scaled_dot_product_attention(q[s], k[s], v[s])
    return out
