"""The GGUF-block products (native/qmatmul.cpp on ggml's kernels) against the pure-torch
reference: the gguf package's own dequantization (numpy, independent of ggml) and an fp32
product. The kernel rounds each input row to 8-bit blocks as llama.cpp does, so the two differ by
that rounding (~0.5% of the output's scale), and no more."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from localai.engine.torch import native
from localai.engine.torch.gguf_header import Tensor
from localai.engine.torch.weights import QLinear, dequantize_rows

# every format the catalog's models and common GGUFs use; K-quants need 256-wide blocks
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K,
         QT.Q6_K, QT.IQ4_NL, QT.F16, QT.BF16, QT.F32]  # fmt: skip


@pytest.fixture(scope="module")
def kernel():
    k = native.load()
    if k is None:
        pytest.fail(f"the native kernels must build wherever tests run: {native.status()}")
    return k


def matrix(kernel, qtype: QT, rows: int, cols: int, seed: int) -> Tensor:
    """A random [rows, cols] matrix in `qtype` blocks, quantized by ggml's own quantizer."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[:, :4] *= 8  # a few outlier columns, as real weights have
    return Tensor(qtype, (rows, cols), kernel.quantize(w, int(qtype)).numpy())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_products_match_the_dequantized_reference(kernel, qtype):
    t = matrix(kernel, qtype, 72, 512, seed=int(qtype))
    fast, ref = QLinear([t], kernel), QLinear([t])
    assert ref.native is None and fast.native is not None
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(1))
    want = x @ ref.dense().T  # N, O
    one = torch.cat([fast(x[i : i + 1]) for i in range(9)])  # the decode shape, row by row
    batch = fast(x)  # the prefill shape: llamafile's GEMM (Q4_0/Q5_0/Q8_0/IQ4_NL) or ggml's
    # the input is rounded as the weights' dot product reads it: 8-bit blocks, or fp16 / bf16
    tol = {QT.F32: 1e-5, QT.F16: 1e-3, QT.BF16: 5e-3}.get(qtype, 0.015)
    assert rel_err(one, want) < tol and rel_err(batch, want) < tol
    assert torch.allclose(batch, one, rtol=1e-5, atol=1e-4 * float(want.abs().max()))
    # ggml's own batched product (its graph API) wherever the memory starts: the same numbers
    # with the input and the weights 4 and 1 bytes off ggml's 32-byte alignment
    assert kernel.has_graph()
    x_off = torch.cat([torch.zeros(1), x.flatten()])[1:].view_as(x)
    raw = np.zeros(t.data.size + 1, np.uint8)
    raw[1:] = t.data.ravel()
    w_off = QLinear([Tensor(qtype, t.shape, raw[1:].reshape(t.data.shape))], kernel)
    assert torch.equal(fast(x_off), batch) and torch.equal(w_off(x), batch)
    # the kernel's decoding of the blocks is the reference's, exactly
    dq = kernel.dequantize(torch.from_numpy(t.data), int(qtype), 512)
    assert torch.allclose(dq, dequantize_rows(t), rtol=0, atol=1e-6)


def test_fused_matrices_of_different_formats_equal_separate_products(kernel):
    """Q, K and V (or gate and up) in one call, each in its own format, as Qwen2.5's GGUFs mix
    Q5_0 and Q8_0 (and the 1.5B Q4_K and Q6_K) within a layer."""
    parts = [matrix(kernel, QT.Q5_0, 64, 256, 1), matrix(kernel, QT.Q8_0, 32, 256, 2),
             matrix(kernel, QT.Q4_K, 40, 256, 3), matrix(kernel, QT.Q6_K, 8, 256, 4)]  # fmt: skip
    fused = QLinear(parts, kernel)
    assert fused.out_features == 144
    for n in (1, 6):
        x = torch.randn(n, 256, generator=torch.Generator().manual_seed(n))
        alone = torch.cat([QLinear([p], kernel)(x) for p in parts], dim=1)
        assert torch.equal(fused(x), alone)


def test_rows_keep_their_file_bytes_and_bad_shapes_are_refused(kernel):
    t = matrix(kernel, QT.Q4_K, 16, 256, 5)
    lin = QLinear([t], kernel)
    assert lin.nbytes == t.data.nbytes == 16 * 144  # Q4_K: 144 bytes per 256 weights
    assert np.shares_memory(lin.rows[0].numpy(), t.data)  # no copy of the weights
    with pytest.raises(RuntimeError, match="x must be"):
        lin(torch.randn(2, 128))
    with pytest.raises(RuntimeError, match="share the input size"):
        kernel.QMatrices([torch.from_numpy(t.data), torch.zeros(4, 18, dtype=torch.uint8)],
                         [int(QT.Q4_K), int(QT.Q4_0)])  # fmt: skip


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_load(kernel):
    """torch's build lock is a plain file: a build killed mid-way (a timeout, Ctrl-C) left it,
    and every later start waited on it forever. The build folder is ours, held by an flock
    that dies with its process, so a lock file found under it is stale and removed."""
    with native.build_dir([native.SOURCES / f for f in native.FILES], native.build_flags()) as d:
        where = d
    (where / "lock").touch()
    code = "from localai.engine.torch import native; assert native.load(), native.status()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not (where / "lock").exists()
