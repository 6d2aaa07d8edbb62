"""Asymmetric low-bit quantization of KV blocks and the bit packing the native kernel reads.

Codes are unsigned b-bit integers, x ≈ code·scale + min, scale = (max - min) / (2^b - 1).
Packing is planar along the last axis: with P = 8/b codes per byte and R = D·b/8 bytes per row,
channel c = p·R + r lives in byte r at bit offset p·b. The unpack loop over r is then contiguous
for each p, which the C++ kernel vectorizes. fp16 holds scale and min (what KIVI stores).

At 2 bits (4 levels) the min/max range wastes most of the levels on the two extreme values of a
group, so `quantize(search=True)` picks, per group, the clipped range with the least squared
error; and `hadamard` spreads a vector's few large channels over all of them (an orthonormal
rotation, its own inverse), which makes a per-token group close to Gaussian and the clipped
range fit it well.
"""

from __future__ import annotations

import torch

# D channels (head dim), R packed bytes per row, P codes per byte


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] integer codes in [0, 2^bits) → [..., D·bits/8] uint8."""
    per = 8 // bits
    d = codes.shape[-1]
    assert d % per == 0, "the head dim must fill whole bytes"
    planes = codes.to(torch.uint8).reshape(*codes.shape[:-1], per, d // per)  # ..., P, R
    out = planes[..., 0, :].clone()
    for p in range(1, per):
        out |= planes[..., p, :] << (p * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., R] uint8 → [..., R·8/bits] codes as uint8."""
    mask = (1 << bits) - 1
    per = 8 // bits
    return torch.cat([(packed >> (p * bits)) & mask for p in range(per)], dim=-1)


# fractions of a group's range that the error search may clip off each end
CLIP = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def quantize(
    x: torch.Tensor, bits: int, dim: int, search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x with one (scale, min) per slice along `dim` (the group axis); with `search`,
    each slice's range is the clipped one (CLIP² candidates) with the least squared error.

    Returns codes (x's shape, uint8), and scale / min in fp16 with `dim` reduced (keepdim)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    best = _grid(x, bits, lo, hi)
    if not search:
        return best
    span = hi - lo
    err = _sq_error(x, *best, dim)
    for a in CLIP:
        for b in CLIP:
            if a == b == 0.0:
                continue
            cand = _grid(x, bits, lo + a * span, hi - b * span)
            e = _sq_error(x, *cand, dim)
            better = e < err
            err = torch.where(better, e, err)
            best = tuple(torch.where(better, c, o) for c, o in zip(cand, best, strict=True))
    return best


def _grid(x, bits, lo, hi):
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half()
    lo = lo.half()
    codes = torch.round((x - lo.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def _sq_error(x, codes, scale, lo, dim) -> torch.Tensor:
    return (dequantize(codes, scale, lo) - x).square_().sum(dim=dim, keepdim=True)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last axis, H the orthonormal Sylvester-Hadamard matrix (H = Hᵀ = H⁻¹);
    the length is a power of two (the head dim)."""
    d = x.shape[-1]
    assert d & (d - 1) == 0, "the Hadamard rotation needs a power-of-two head dim"
    return x @ _hadamard_matrix(d, x.dtype)


_H: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _hadamard_matrix(d: int, dtype: torch.dtype) -> torch.Tensor:
    if (d, dtype) not in _H:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # Sylvester doubling
        _H[(d, dtype)] = (h / d**0.5).to(dtype)
    return _H[(d, dtype)]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + lo.float()
