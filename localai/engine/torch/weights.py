"""Weights read per tensor, by name, straight from a GGUF file's memory map.

Nothing is loaded up front: `linear(name)` dequantizes one tensor and packs it for torch's CPU
weight-only kernels, `rows(name, ids)` dequantizes only the embedding rows a batch needs, so the
embedding table stays in the (shared, evictable) page cache instead of a second copy in RAM.

Packing, chosen from measurements on this machine (see BENCHMARKS.md, torch runner):
- Q4_0 / Q4_1 blocks (32 weights, scale d and offset m) map exactly onto torch's int4 layout
  (`_weight_int4pack_mm_for_cpu`, group 32, w = (q - 8)·scale + zero): zero = m + 8d. No
  re-quantization error beyond bf16 scales.
- every other type (Q5_0, Q8_0, K-quants, F16) is dequantized and re-quantized to int8 per output
  row (`_weight_int8pack_mm`): a matrix-vector product over int8 rows with bf16 activations ran
  1.5-2x faster than bf16 weights and 10x+ faster than int8 with fp32 activations.
- the output head's compact copy (head.py) is int4 in groups of 32 whatever the source type
  (`compact`): it only has to rank candidates, whose exact logits come from `rows`.
Both kernels take bf16 activations; the residual stream and norms stay fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from .gguf_header import Tensor, read_header

# O output rows, I input columns, G = 32 weights per quantization group
GROUP = 32
# rows re-quantized at a time by `compact`; a multiple of 64, the row blocks int4pack interleaves
ROW_BLOCK = 8192


# glibc mallopt() parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# bytes: while unpacking, blocks this big get their own mapping. The fp32 copies of the large
# tensors are bigger; the packed weights mostly smaller, so they stay in the heap (mapping them
# too, from 1 MiB, made decoding ~2.5% slower)
MAP_FROM = 16 << 20


@contextlib.contextmanager
def temporaries_returned() -> Iterator[None]:
    """While weights are unpacked, glibc's malloc gives each block of MAP_FROM bytes or more its
    own mapping, so every large fp32 copy goes back to the system when it is freed. Left to
    itself, malloc raises that threshold after the first large free (up to 32 MiB) and then
    keeps the freed copies in its heap: loading qwen2.5-coder-0.5b (422 MiB packed) peaked at
    1.7-2.2 GB RSS and kept 0.9-1.5 GB of anonymous memory, against 1.2 GB and 0.65 GB with
    this (bench/torch_runner.py load). Afterwards the thresholds are set to where the dynamic
    ones end up (32 MiB to map, 64 MiB of free heap top before trimming), so decoding allocates
    as before, and the heap is trimmed. Without glibc (no `mallopt`), nothing changes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MAP_FROM)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)
        trim(0)


class PackedLinear:
    """y = x @ W.T with W packed int4 (group 32) or int8 (per row); x is [N, I] fp32."""

    def __init__(self, kind: str, data: torch.Tensor, scales: torch.Tensor, out_features: int):
        assert kind in ("int4", "int8")
        self.kind, self.data, self.scales, self.out_features = kind, data, scales, out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.data, GROUP, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.data, self.scales)
        return y[:, : self.out_features].float()  # int4 rows may be padded to a multiple of 16

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes


def pack_int8(w: torch.Tensor) -> PackedLinear:
    """Symmetric int8 per output row; w is [O, I] fp32."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # O
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # O, I
    return PackedLinear("int8", q, scale.to(torch.bfloat16), w.shape[0])


def pack_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of 32 along the input: w is [O, I] fp32 → (int4pack codes,
    scale-and-zero [I/G, O, 2] bf16), dequantizing as w = (q - 8)·scale + zero."""
    o, i = w.shape
    g = w.view(o, i // GROUP, GROUP)  # O, I/G, G
    lo, hi = g.amin(-1), g.amax(-1)  # O, I/G
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)  # O, I/G, G
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(o, i), 1)
    sz = torch.stack([scale.T, (lo + 8 * scale).T], dim=-1)  # I/G, O, 2
    return packed, sz.to(torch.bfloat16)


def pad_rows(w: torch.Tensor, multiple: int) -> torch.Tensor:
    """w with zero rows appended up to a multiple of `multiple` (int4pack wants O % 16 == 0)."""
    extra = -w.shape[0] % multiple
    return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w


def pack_q4(raw: np.ndarray, qtype: QT, out_features: int, in_features: int) -> PackedLinear:
    """GGML Q4_0/Q4_1 blocks → torch int4pack without re-quantizing the 4-bit codes."""
    blocks = raw.reshape(out_features, in_features // GROUP, -1)  # O, I/G, block bytes
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # O, I/G
    if qtype == QT.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
    else:  # Q4_0: w = d·(q - 8)
        m = -8.0 * d
        qs = blocks[..., 2:]
    # a block's 16 bytes hold weights j (low nibble) and j + 16 (high nibble)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.from_numpy(codes.astype(np.int32)), 1
    )
    zero = m + 8.0 * d
    sz = torch.from_numpy(np.stack([d.T, zero.T], axis=-1))  # I/G, O, 2
    return PackedLinear("int4", packed, sz.to(torch.bfloat16).contiguous(), out_features)


class GGUFWeights:
    """Named tensors of one GGUF file, read lazily over a memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata, infos, data_start = read_header(self.path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors = {}
        for name, (qtype, dims, offset) in infos.items():
            block, size = GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * size
            start = data_start + offset
            raw = self._map[start : start + rows * row_bytes].reshape(rows, row_bytes)
            self.tensors[name] = Tensor(qtype, tuple(reversed(dims)), raw)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dense(self, name: str) -> torch.Tensor:
        """One tensor dequantized to fp32 (small ones: norms, biases)."""
        t = self.tensors[name]
        arr = dequantize(t.data, t.qtype)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(t.shape)

    def linear(self, names: str | list[str]) -> PackedLinear:
        """One packed matrix; a list of names is fused along the output rows (Q, K, V)."""
        names = [names] if isinstance(names, str) else names
        ts = [self.tensors[n] for n in names]
        shapes = [self.shape(n) for n in names]
        in_f = shapes[0][1]
        assert all(s[1] == in_f for s in shapes), "fused matrices share the input dim"
        qtype = ts[0].qtype
        if qtype in (QT.Q4_0, QT.Q4_1) and in_f % GROUP == 0 and all(t.qtype == qtype for t in ts):
            raw = np.concatenate(
                [np.asarray(t.data).reshape(s[0], -1) for t, s in zip(ts, shapes, strict=True)]
            )
            return pack_q4(raw, qtype, sum(s[0] for s in shapes), in_f)
        return pack_int8(torch.cat([self.dense(n) for n in names]))  # O, I

    def compact(self, name: str) -> PackedLinear:
        """An int4 (group 32) copy of one matrix, for approximate products: Q4_0/Q4_1 as they are,
        any other type re-quantized ROW_BLOCK rows at a time (the fp32 matrix never exists
        whole: the output matrix of a 150K-token vocabulary would be 0.5 GB)."""
        t = self.tensors[name]
        o, i = t.shape
        assert i % GROUP == 0, f"{name}: {i} columns are not whole groups of {GROUP}"
        if t.qtype in (QT.Q4_0, QT.Q4_1):
            return pack_q4(np.asarray(t.data), t.qtype, o, i)
        parts = [pack_int4(pad_rows(self.row_block(name, a, min(a + ROW_BLOCK, o)), 16))
                 for a in range(0, o, ROW_BLOCK)]  # fmt: skip
        packed = torch.cat([p for p, _ in parts])  # O, I/2
        sz = torch.cat([z for _, z in parts], dim=1).contiguous()  # I/G, O, 2
        return PackedLinear("int4", packed, sz, o)

    def row_block(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, dequantized: [stop - start, I] fp32."""
        t = self.tensors[name]
        arr = dequantize(t.data[start:stop], t.qtype)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(stop - start, -1)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor (embedding rows, the output head's candidates),
        dequantized: [N, I] fp32."""
        t = self.tensors[name]
        data = t.data[ids.numpy()]  # N, row bytes (or N, I for float types)
        arr = dequantize(data, t.qtype)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(len(ids), -1)

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].data.nbytes)
