"""Vectors: compact codes for chunk embeddings, and exact-over-codes search in memory.

A codec turns (N, 384) float32 unit vectors into fixed-size byte codes stored in the chunk row
(so a chunk and its vector are written in one transaction), and scores a float query against a
matrix of codes (asymmetric: the query is never quantised). Codecs are data-independent, so an
index needs no training pass and a code never has to be recomputed when the corpus grows.

The codec of an index is recorded in its meta table when the index is created; opening an index
with another default keeps the recorded one. BENCHMARKS.md has the storage / recall / latency
table that chose the default. On NFCorpus chunks (bench/index_vectors.py, index_fusion.py):

    codec  bytes  share of text  recall@10 vs f32  hybrid nDCG@10 (f32: 0.3551)
    int8    384       48%             0.986              0.3552
    q4r     194       24%             0.948              0.3562
    int4    194       24%             0.925              0.3558
    bin1     48        6%             0.650              0.3480  (below the RRF baseline 0.3507)

q4r is the default: half the bytes of int8 at the same hybrid quality (the differences are
within the ±0.005 noise of 323 queries). Its recall is 0.002 under the 0.95 goal (standard
error ±0.004); the misses are near-ties (re-scoring its top 12 exactly gives 0.990).
The 6% storage goal is met only by 48-byte codes, which lose recall (trained PQ-48 reaches
0.71); closing that gap needs re-scoring the top ~48 by embeddings recomputed from the text
(0.95 at 48), ~0.4 s per query on two cores: the `vector_rescore` setting (bench/index_rescore.py).

`VectorSet` holds every vector of the index in RAM, decoded once (whatever the codec) to bf16
where the CPU multiplies bf16 in hardware (768 bytes a chunk; at 100k chunks a scan takes 2.4
ms against 4.6 ms over float32, and recall@10 of q4r stays 0.948-0.950), else to float32 (1.5
KB); one matrix-vector product scans it, and the governor is told its size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

DIM = 384


@dataclass(frozen=True)
class Codec:
    name: str
    nbytes: int

    def encode(self, vecs: np.ndarray) -> np.ndarray:
        """(N, 384) float32 → (N, nbytes) uint8 codes."""
        raise NotImplementedError

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(N, nbytes) uint8 → (N, 384) float32 approximations (for scoring)."""
        raise NotImplementedError

    def scores(self, codes: np.ndarray, query: np.ndarray) -> np.ndarray:
        """(N,) approximate cosines of codes against one (384,) query, for a few thousand
        candidates at a time (the PostgreSQL store); equal to decode(codes) @ query."""
        return self.decode(codes) @ query.astype(np.float32)


class Float32(Codec):
    """Exact: the reference every other codec is measured against."""

    def encode(self, vecs):
        return np.ascontiguousarray(vecs, dtype=np.float32).view(np.uint8)

    def decode(self, codes):
        return np.ascontiguousarray(codes).view(np.float32)


class Int8(Codec):
    """One signed byte per dimension, fixed scale: unit-vector components stay within ±0.5."""

    SCALE = 127 / 0.5

    def encode(self, vecs):
        q = np.clip(np.rint(vecs * self.SCALE), -127, 127).astype(np.int8)
        return q.view(np.uint8)

    def decode(self, codes):
        return np.ascontiguousarray(codes).view(np.int8).astype(np.float32) / self.SCALE


class Int4(Codec):
    """Two dimensions per byte, per-vector scale in a float16 header (2 bytes)."""

    def encode(self, vecs):
        scale = np.maximum(np.abs(vecs).max(axis=1, keepdims=True), 1e-6) / 7.0  # (N, 1)
        q = (np.clip(np.rint(vecs / scale), -7, 7).astype(np.int8) + 8).astype(np.uint8)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]  # (N, 192)
        head = scale.astype(np.float16).view(np.uint8)  # (N, 2)
        return np.concatenate([head, packed], axis=1)

    def decode(self, codes):
        codes = np.ascontiguousarray(codes)
        scale = codes[:, :2].copy().view(np.float16).astype(np.float32)  # (N, 1)
        packed = codes[:, 2:]
        q = np.empty((len(codes), DIM), dtype=np.float32)
        q[:, 0::2] = (packed >> 4).astype(np.float32) - 8
        q[:, 1::2] = (packed & 15).astype(np.float32) - 8
        return q * scale


class Bin1(Codec):
    """One bit per dimension after a fixed random rotation (seed 0): 48 bytes. The rotation
    spreads MiniLM's few large components over all dimensions, so signs keep more of the angle;
    decoding gives the rotated-back sign vector, scored against the float query."""

    def encode(self, vecs):
        return np.packbits(vecs @ _rotation() > 0, axis=1)  # (N, 48)

    def decode(self, codes):
        bits = np.unpackbits(np.ascontiguousarray(codes), axis=1)[:, :DIM].astype(np.float32)
        return ((bits * 2 - 1) / np.sqrt(DIM)) @ _rotation().T


class Q4R(Codec):
    """4 bits per dimension after the fixed rotation, on Gaussian-optimal levels: 194 bytes.

    Rotated, a unit vector's coordinates are close to Gaussian with the same spread, so each is
    divided by the vector's RMS and mapped to the nearest of the 16 Lloyd-Max levels for N(0, 1)
    (the mean-squared-error-optimal quantizer; uniform levels waste codes on the rare tails).
    The float16 header is not the RMS itself but the scale that makes the decoded vector the
    least-squares fit of the original: per-vector length errors would otherwise reorder
    near-ties."""

    LEVELS = np.array([0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326])

    def encode(self, vecs):
        y = np.asarray(vecs, dtype=np.float32) @ _rotation()  # (N, 384)
        rms = np.maximum(np.sqrt((y * y).mean(axis=1, keepdims=True)), 1e-12)  # (N, 1)
        q = np.searchsorted(_q4_bounds(), y / rms).astype(np.uint8)  # (N, 384) in 0..15
        d = _q4_levels()[q]
        fit = (d * y).sum(axis=1, keepdims=True) / np.maximum(
            (d * d).sum(axis=1, keepdims=True), 1e-12
        )
        head = fit.astype(np.float16).view(np.uint8)  # (N, 2)
        return np.concatenate([head, (q[:, 0::2] << 4) | q[:, 1::2]], axis=1)

    def decode(self, codes):
        scale, q = self._split(codes)
        return (_q4_levels()[q] * scale) @ _rotation().T

    def scores(self, codes, query):
        """Without decoding: the rotation moves to the query, ((levels * scale) @ Rᵀ) · x =
        (levels * scale) · (x @ R), and each code byte (two dimensions) looks its share up in
        a (256, 192) table made from the query once."""
        codes = np.ascontiguousarray(codes)
        scale = codes[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]  # (N,)
        x = query.astype(np.float32) @ _rotation()  # (384,) the query, rotated
        lv, byte = _q4_levels(), np.arange(256)
        table = lv[byte >> 4, None] * x[0::2] + lv[byte & 15, None] * x[1::2]  # (256, 192)
        return table[codes[:, 2:], np.arange(DIM // 2)].sum(axis=1) * scale  # (N,)

    @staticmethod
    def _split(codes) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1) float32 scales and (N, 384) level indices of codes."""
        codes = np.ascontiguousarray(codes)
        scale = codes[:, :2].copy().view(np.float16).astype(np.float32)  # (N, 1)
        q = np.empty((len(codes), DIM), dtype=np.uint8)
        q[:, 0::2], q[:, 1::2] = codes[:, 2:] >> 4, codes[:, 2:] & 15
        return scale, q


@functools.cache
def _q4_levels() -> np.ndarray:
    return np.concatenate([-Q4R.LEVELS[::-1], Q4R.LEVELS]).astype(np.float32)  # (16,)


@functools.cache
def _q4_bounds() -> np.ndarray:
    lv = _q4_levels()
    return (lv[1:] + lv[:-1]) / 2  # (15,) decision thresholds


@functools.cache
def _rotation() -> np.ndarray:
    """(384, 384) orthogonal, fixed by its seed; built on first use (a QR costs ~0.5 s, which
    every `localai` command would otherwise pay at import)."""
    rng = np.random.default_rng(0)
    q, r = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


CODECS: dict[str, Codec] = {
    "f32": Float32("f32", DIM * 4),
    "int8": Int8("int8", DIM),
    "int4": Int4("int4", DIM // 2 + 2),
    "bin1": Bin1("bin1", DIM // 8),
    "q4r": Q4R("q4r", DIM // 2 + 2),
}
DEFAULT_CODEC = "q4r"


def codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown vector codec {name!r}; known: {', '.join(CODECS)}")
    return CODECS[name]


class VectorSet:
    """All vectors of an index in RAM with their chunk ids; top-k by (approximate) cosine.

    Codes are decoded once, at load, into one matrix: a matrix-vector product per query then
    scans 100k chunks in a few milliseconds, whatever the codec. The matrix is bf16 (a torch
    tensor) when `bf16` is true, by default when the CPU has bf16 arithmetic and the codec is
    not the exact float32 one; otherwise float32 (numpy). RAM is reported to the governor; the
    disk keeps only the compact codes."""

    BLOCK = 16384

    def __init__(self, c: Codec, ids: np.ndarray, codes: np.ndarray, bf16: bool | None = None):
        assert codes.shape == (len(ids), c.nbytes), (codes.shape, len(ids), c.nbytes)
        self.codec, self.ids = c, ids
        if bf16 is None:
            bf16 = c.name != "f32" and _bf16_native()
        starts = range(0, len(ids), self.BLOCK)
        blocks = (c.decode(codes[s : s + self.BLOCK]) for s in starts)  # (≤ BLOCK, 384) f32
        if bf16:
            import torch

            parts = [torch.from_numpy(np.ascontiguousarray(b)).to(torch.bfloat16) for b in blocks]
            self.mat = torch.cat(parts) if parts else torch.zeros((0, DIM), dtype=torch.bfloat16)
        else:
            self.mat = np.empty((len(ids), DIM), dtype=np.float32)  # (N, 384)
            for s, b in zip(starts, blocks, strict=True):
                self.mat[s : s + len(b)] = b

    @classmethod
    def from_rows(cls, c: Codec, rows: list[tuple[int, bytes]]) -> VectorSet:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        buf = b"".join(r[1] for r in rows)
        codes = np.frombuffer(buf, dtype=np.uint8).reshape(len(rows), c.nbytes)
        return cls(c, ids, codes)

    @property
    def bf16(self) -> bool:
        return not isinstance(self.mat, np.ndarray)

    @property
    def nbytes(self) -> int:
        mat = self.mat.nbytes if isinstance(self.mat, np.ndarray) else self.mat.numel() * 2
        return mat + self.ids.nbytes

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, scores) of the k best vectors for one (384,) query, best first."""
        n = len(self.ids)
        if n == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if self.bf16:
            import torch

            q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
            scores = (self.mat @ q.to(torch.bfloat16)).float().numpy()  # (N,)
        else:
            scores = self.mat @ query.astype(np.float32)  # (N,)
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return self.ids[top], scores[top]


@functools.cache
def _bf16_native() -> bool:
    from .bert import bf16_is_native

    return bf16_is_native()
