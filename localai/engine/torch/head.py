"""The output head: final hidden states → logits over the vocabulary, in two passes.

The output matrix is the largest single matrix a small model reads per token (Qwen2.5-0.5B:
151,936 × 896, 272 MB in fp16, 43% of a decode step's bytes). Pass 1 scores every token against
a compact int4 copy (groups of 32: 85 MB, `_weight_int4pack_mm_for_cpu`); pass 2 recomputes the
K best candidates of each position in fp32 from the GGUF tensor's own rows, dequantized on
demand from the memory map, and writes them over their approximations.

Contract: in each row of the result, the K highest approximate logits are replaced by exact ones
(fp32 products with the GGUF's weights, as `exact_logits` computes them); the others stay
approximate (int4 error, measured: mean |Δ| 0.17-0.38 logits, max 2.4-4.3). Greedy decoding and
top-k / top-p / min-p sampling read only the best tokens, so they see exact values wherever the
true best tokens rank among the approximate top K. `bench/torch_runner.py head` measures how
often they do not: over 2,048 positions of each test model the exact top-1 ranked at worst 8th
(SmolLM2) and 4th (Qwen) in the approximate order, so its choice never differed from the exact
head's. The tokens the default min-p (0.05) keeps were all inside the top 64 at 98% (SmolLM2)
and 99.6% (Qwen) of positions, the exact top 40 (top-k's default) at 77% and 99%.

Scoring every position (perplexity, the agreement tests) does not use the two passes: a target
may rank anywhere, and the int4 noise in the tail inflates the log-sum-exp, a bias rather than
noise (perplexity +0.42% on SmolLM2, +0.24% on Qwen). At 256 positions per call the int4 kernel
is no faster than fp32 anyway (Qwen: 1.19 s two-pass vs 1.09 s exact), so `exact_logits`
serves those calls.

A head is anything with `__call__(x [C, E]) -> [C, V]` and `nbytes`; the model builds it in
`make_head`, the seam for other heads (e.g. one over a pruned vocabulary).
"""

from __future__ import annotations

import torch

from .arch import Hparams
from .weights import ROW_BLOCK, GGUFWeights

# C positions, E model dim, V vocabulary, K candidates per position, U distinct candidates


class TwoPassHead:
    # 64 candidates: the exact top-1 always ranked in the int4 top 8 (an 8x margin); pass 2,
    # top-K selection included, costs 0.6-1.5 ms per token against pass 1's 1.6-9.8 ms.
    K = 64

    def __init__(self, w: GGUFWeights, name: str, k: int = K):
        self.w, self.name, self.k = w, name, k
        self.approx = w.compact(name)  # V, E as int4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [C, E] fp32 → logits [C, V], exact for each row's top K."""
        logits = self.approx(x)  # C, V
        top = logits.topk(min(self.k, logits.shape[1]), dim=-1).indices  # C, K
        ids, where = torch.unique(top, return_inverse=True)  # U; C, K (index into ids)
        exact = x @ self.w.rows(self.name, ids).T  # C, U
        return logits.scatter_(1, top, exact.gather(1, where))

    def exact_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: x @ W.T in fp32 over every row of the GGUF tensor (slow; tests, bench)."""
        v = self.approx.out_features
        blocks = [x @ self.w.row_block(self.name, a, min(a + ROW_BLOCK, v)).T
                  for a in range(0, v, ROW_BLOCK)]  # fmt: skip
        return torch.cat(blocks, dim=1)  # C, V

    @property
    def nbytes(self) -> int:
        return self.approx.nbytes  # the exact rows stay in the (shared, evictable) page cache


def make_head(w: GGUFWeights, hp: Hparams) -> TwoPassHead:
    """The output head; tied models score against the embedding table."""
    out = hp.name("output") if hp.name("output") in w else hp.name("embed")
    return TwoPassHead(w, out)
