"""Next-token choice from logits, with the same knobs (and order) as llama.cpp's sampler chain:
repeat penalty, then top-k, top-p, min-p, then temperature. Greedy when temperature is 0."""

from __future__ import annotations

import torch

from ..base import SamplingParams

# V vocabulary
REPEAT_WINDOW = 64  # llama.cpp's default penalty window


def sample(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, history: list[int]
) -> int:
    """logits: [V] fp32 → one token id."""
    if params.repeat_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history[-REPEAT_WINDOW:])))
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(
            vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty
        )
    if params.temperature == 0:
        return int(torch.argmax(logits))
    if params.top_k > 0:
        top = torch.topk(logits, min(params.top_k, logits.shape[0]))
        vals, ids = top.values, top.indices  # K
    else:
        vals, ids = torch.sort(logits, descending=True)  # V
    probs = torch.softmax(vals, dim=-1)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs, dim=-1)
        keep = int((cum < params.top_p).sum()) + 1  # the smallest prefix reaching top_p
        vals, ids, probs = vals[:keep], ids[:keep], probs[:keep]
    if params.min_p > 0:
        keep = probs >= params.min_p * probs[0]
        vals, ids = vals[keep], ids[keep]
    probs = torch.softmax(vals / params.temperature, dim=-1)
    return int(ids[torch.multinomial(probs, 1, generator=gen)])
