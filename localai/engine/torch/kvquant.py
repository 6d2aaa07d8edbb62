"""Asymmetric low-bit quantization of KV blocks and the bit packing the native kernel reads.

Codes are unsigned b-bit integers, x ≈ code·scale + min, scale = (max - min) / (2^b - 1).
Packing is planar along the last axis: with P = 8/b codes per byte and R = D·b/8 bytes per row,
channel c = p·R + r lives in byte r at bit offset p·b. The unpack loop over r is then contiguous
for each p, which the C++ kernel vectorizes. fp16 holds scale and min (what KIVI stores).
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


CLIP = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # fractions of the range tried off each end


def quantize(
    x: torch.Tensor, bits: int, dim: int, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x with one (scale, min) per slice along `dim` (the group axis).

    With `clip`, each slice's range is shrunk at either end by the fractions in CLIP, keeping
    the pair with the least squared error (no clipping is one of them, so it never does worse).
    Returns codes (x's shape, uint8), and scale / min in fp16 with `dim` reduced (keepdim)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    if not clip:
        return _codes(x, bits, lo, hi)
    width = hi - lo
    codes, scale, lo_q = _codes(x, bits, lo, hi)
    best_err = ((dequantize(codes, scale, lo_q) - x) ** 2).sum(dim=dim, keepdim=True)
    for a in CLIP:
        for b in CLIP:
            c2, s2, m2 = _codes(x, bits, lo + a * width, hi - b * width)
            err = ((dequantize(c2, s2, m2) - x) ** 2).sum(dim=dim, keepdim=True)
            better = err < best_err  # the slice's shape with `dim` reduced
            best_err = torch.where(better, err, best_err)
            codes = torch.where(better, c2, codes)
            scale, lo_q = torch.where(better, s2, scale), torch.where(better, m2, lo_q)
    return codes, scale, lo_q


SYM = tuple(1.0 - 0.05 * i for i in range(13))  # shares of max|x| tried for the half-range


def quantize_sym(
    x: torch.Tensor, bits: int, dim: int, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x symmetrically around 0 with one scale per slice along `dim`:
    x ≈ (code - (2^b - 1)/2)·scale. With `clip`, the half-range is searched over the shares
    SYM of max|x| for the least squared error. Returns codes and the fp16 scale (keepdim)."""
    half = ((1 << bits) - 1) / 2
    top = x.abs().amax(dim=dim, keepdim=True)

    def at(share: float):  # codes, scale and squared error with the half-range share·max|x|
        scale = (top * share / half).clamp_min(1e-8).half()
        codes = torch.round(x / scale.float() + half).clamp_(0, 2 * half).to(torch.uint8)
        return codes, scale, ((dequantize_sym(codes, scale, bits) - x) ** 2).sum(dim, True)

    codes, scale, best_err = at(SYM[0])  # the whole range
    for share in SYM[1:] if clip else ():
        c2, s2, err = at(share)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        codes, scale = torch.where(better, c2, codes), torch.where(better, s2, scale)
    return codes, scale


def dequantize_sym(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.float() - ((1 << bits) - 1) / 2) * scale.float()


def _codes(x, bits, lo, hi):
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half()
    lo = lo.half()
    codes = torch.round((x - lo.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + lo.float()
