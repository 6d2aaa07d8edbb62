"""Weights read per tensor, by name, straight from a GGUF file's memory map.

Nothing is loaded or converted: a matrix stays in its GGUF block format (Q4_0, Q4_1, Q5_0, Q8_0,
Q4_K, Q5_K, Q6_K, F16, ...) in the file's pages, and `QLinear` multiplies by it in place with
ggml's own CPU kernels (native/qmatmul.cpp), the same arithmetic as llama.cpp. So the weights
cost no RAM beyond the (shared, evictable) page cache, a model loads in a fraction of a second,
and the runner and llama.cpp read the same bytes per token. `rows(name, ids)` dequantizes only
the embedding rows a batch needs.

Without the C++ kernels (no compiler), a matrix is dequantized to fp32 on first use and kept:
correct, several times the RAM, and slow; native.status() says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from . import native
from .gguf_header import Tensor, read_header

# N input rows, O output rows, I input columns


class QLinear:
    """y = x @ W.T, x [N, I] fp32 → [N, O] fp32, for one or more GGUF matrices that read the
    same input, their outputs side by side (Q, K and V; gate and up): one kernel call, the input
    rounded once per dot-product format."""

    def __init__(self, parts: list[Tensor], kernel=None):
        self.parts = parts
        self.rows = [torch.from_numpy(p.data) for p in parts]  # O_j, row bytes (the file's)
        self.types = [int(p.qtype) for p in parts]
        self.in_features = parts[0].shape[1]
        assert all(p.shape[1] == self.in_features for p in parts), "fused matrices share I"
        self.out_features = sum(p.shape[0] for p in parts)
        self._dense: torch.Tensor | None = None
        # the C++ product (native.load()), or None: the reference
        self.native = kernel.QMatrices(self.rows, self.types) if kernel else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return x @ self.dense().T
        return self.native(x)

    def dense(self) -> torch.Tensor:
        """W dequantized to fp32 [O, I] by the gguf package's numpy code (independent of ggml):
        the reference the kernel is tested against, and the fallback without it (then kept)."""
        if self._dense is None:
            self._dense = torch.cat([dequantize_rows(p) for p in self.parts])
        return self._dense

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)


def dequantize_rows(t: Tensor, data: np.ndarray | None = None) -> torch.Tensor:
    """Rows of a GGUF tensor (all of them, or `data`, a selection of its raw rows) as fp32."""
    data = t.data if data is None else data
    arr = dequantize(data, t.qtype)
    return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(len(data), -1)


class GGUFWeights:
    """Named tensors of one GGUF file, read lazily over a memory map. With `use_native` false
    (tests of the references) every product and dequantization takes the pure-torch path."""

    def __init__(self, path: Path, use_native: bool = True):
        self.path = Path(path)
        self.kernel = native.load() if use_native else None
        self.metadata, infos, data_start = read_header(self.path)
        # copy-on-write: torch wants writable arrays; nothing writes, so no page is copied
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        self.tensors = {}
        for name, (qtype, dims, offset) in infos.items():
            block, size = GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * size
            start = data_start + offset
            raw = self._map[start : start + rows * row_bytes].reshape(rows, row_bytes)
            self.tensors[name] = Tensor(qtype, tuple(reversed(dims)), raw, start)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dense(self, name: str) -> torch.Tensor:
        """One tensor dequantized to fp32 (small ones: norms, biases)."""
        t = self.tensors[name]
        return dequantize_rows(t).reshape(t.shape)

    def linear(self, names: str | list[str]) -> QLinear:
        """One matrix, or several fused along the output rows (Q, K, V), in place."""
        names = [names] if isinstance(names, str) else names
        return QLinear([self.tensors[n] for n in names], self.kernel)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor (embedding rows), dequantized: [N, I] fp32."""
        t = self.tensors[name]
        data = t.data[ids.numpy()]  # N, row bytes
        if self.kernel is None:
            return dequantize_rows(t, data)
        return self.kernel.dequantize(torch.from_numpy(data), int(t.qtype), t.shape[1])

    def nbytes(self, name: str) -> int:
        return int(self.tensors[name].data.nbytes)
