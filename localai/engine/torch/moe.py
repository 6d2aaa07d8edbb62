"""The mixture-of-experts FFN: a router picks k of X experts per token, and the token's output is
the weighted sum of those experts' SwiGLU FFNs (plus, in Qwen2-MoE, a shared expert every token
uses, scaled by a sigmoid gate).

Routing is llama.cpp's for these architectures (llm_graph_context::build_moe_ffn): softmax over
all X router logits in fp32, the k largest probabilities, their weights renormalised to sum to
1 where the architecture does (`ArchSpec.norm_topk`: Mixtral, Qwen3-MoE) and used as they are
otherwise (Qwen2-MoE, OLMoE). An expert's matrices are rows of the stacked `ffn_*_exps`
tensors, multiplied in their GGUF block format by the same kernels as the dense layers
(weights.QLinear), so the experts compute what llama.cpp computes.

Contract: `MoEFFN(x [C, E])` → x + FFN output [C, E] (the residual included, as DenseFFN);
`step(x [1, E])` updates x in place. Experts come from a store by index (experts.py): in place
from the memory map, or read into a RAM budget; both give the same bytes, so the same result.
"""

from __future__ import annotations

import torch

from .arch import Hparams
from .experts import ResidentExperts
from .model import rms_norm, swiglu
from .weights import GGUFWeights

# C tokens, E model dim, X experts, K experts per token, F expert hidden size
# llama.cpp clamps the sum of the top-k weights to fp16's smallest normal before dividing
MIN_WEIGHT_SUM = 6.103515625e-5


class MoEFFN:
    """x + Σ_k w_k · expert_k(h) (+ σ(g·h) · shared(h)), h = rms_norm(x)."""

    def __init__(self, w: GGUFWeights, hp: Hparams, i: int, experts=None):
        self.norm, self.eps = w.dense(hp.name("ffn_norm", i)), hp.norm_eps
        self.router = w.linear(hp.name("router", i))  # X, E
        self.experts = experts or ResidentExperts(w, hp, i)  # experts.py: e → (gate_up, down)
        self.layer, self.trace = i, None  # trace: a routing.TraceWriter, when recording
        self.next: MoEFFN | None = None  # the next layer, when its experts are prefetched
        self.k, self.norm_topk = hp.n_experts_used, hp.spec.norm_topk
        self.shared = None
        if hp.spec.shared_expert:
            names = [hp.name(k, i) for k in ("shared_router", "shared_gate", "shared_up")]
            self.shared_gate = w.dense(names[0])  # E
            self.shared = (w.linear(names[1:]), w.linear(hp.name("shared_down", i)))

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts and their weights: ids [C, K] (most probable first), w [C, K]."""
        probs = torch.softmax(self.router(h), dim=-1)  # C, X
        w, ids = probs.topk(self.k, dim=-1)  # C, K
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True).clamp_min(MIN_WEIGHT_SUM)
        return ids, w

    def predict(self, x: torch.Tensor) -> list[int]:
        """The experts this layer would choose for one token if its input were `x` [1, E]: the
        previous layer's input is close enough to guess which to read ahead."""
        return self.route(rms_norm(x, self.norm, self.eps))[0][0].tolist()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.norm, self.eps)  # C, E
        ids, w = self.route(h)
        if self.trace is not None:
            self.trace.record(self.layer, ids)
        chosen = ids.unique().tolist()
        loads = self.experts.fetch(chosen)  # misses read in parallel, while the lines below run
        if x.shape[0] == 1:  # one-token steps are where a guess can run ahead of the reads
            self.experts.score_prediction(chosen)
            if self.next is not None:  # read the next layer's while this one computes
                self.next.experts.prefetch(self.next.predict(x))
        out = torch.zeros_like(x)  # C, E
        for e in chosen:  # each expert once, over the tokens that chose it
            rows, slot = (ids == e).nonzero(as_tuple=True)
            gate_up, down = loads[e].result()
            y = swiglu(gate_up, down, h[rows])  # n, E
            out.index_add_(0, rows, y * w[rows, slot, None])
        if self.shared is not None:
            gate = torch.sigmoid(h @ self.shared_gate)[:, None]  # C, 1
            out += swiglu(*self.shared, h) * gate  # C, E
        return x + out

    def step(self, x: torch.Tensor) -> None:
        """One token, x [1, E] updated in place."""
        x.copy_(self(x))

    @property
    def nbytes(self) -> int:
        total = self.router.nbytes + self.experts.nbytes
        if self.shared is not None:
            total += self.shared_gate.nbytes + sum(m.nbytes for m in self.shared)  # fp32 gate
        return total
