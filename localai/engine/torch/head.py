"""The output head: final hidden states → logits over the vocabulary.

The output matrix is the largest single matrix a small model reads per token (Qwen2.5-0.5B:
151,936 × 896, 145 MB in Q8_0). It is multiplied in place in its GGUF format (weights.QLinear),
as llama.cpp does.

A head is anything with `__call__(x [C, E]) -> [C, V]`, `exact_logits` and `nbytes`; the model
builds it in `make_head`, the seam for other heads (e.g. one over a pruned vocabulary).
"""

from __future__ import annotations

import torch

from .arch import Hparams
from .weights import GGUFWeights

# C positions, E model dim, V vocabulary


class Head:
    def __init__(self, w: GGUFWeights, name: str):
        self.matrix = w.linear(name)  # V, E

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x)  # C, V

    exact_logits = __call__

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes


def make_head(w: GGUFWeights, hp: Hparams) -> Head:
    """The output head; tied models score against the embedding table."""
    out = hp.name("output") if hp.name("output") in w else hp.name("embed")
    return Head(w, out)
