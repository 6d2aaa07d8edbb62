"""Perplexity of a text under a model, for either backend, on the same token windows.

The text is tokenized once (no BOS, no control tokens) and cut into consecutive windows of
`ctx` tokens; in each window every token after the first is scored given all tokens before it
in that window. Both backends see identical windows, so their numbers compare directly (the
torch runner's correctness tests and the KV-quantization benchmarks rely on that).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import EngineError


@dataclass
class Perplexity:
    ppl: float
    tokens: int  # tokens scored
    seconds: float

    def as_dict(self) -> dict:
        return {"ppl": round(self.ppl, 4), "tokens": self.tokens, "seconds": round(self.seconds, 2)}


def windows(tokens: list[int], ctx: int) -> list[list[int]]:
    out = [tokens[i : i + ctx] for i in range(0, len(tokens), ctx)]
    out = [w for w in out if len(w) > 1]
    if not out:
        raise EngineError("the text is too short to score: it needs at least two tokens")
    return out


def llama_nll(llm, window: list[int]) -> float:
    """-sum log p over window[1:] from a llama_cpp.Llama opened with logits_all=True."""
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # N-1, V
    mx = logits.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
    return float((lse - logits[np.arange(len(window) - 1), window[1:]]).sum())


def measure_llama(path: Path, text: str, ctx: int, threads: int, type_k="f16", type_v="f16"):
    import llama_cpp

    from .llamacpp import GGML_TYPES

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=ctx, n_batch=512, n_threads=threads,
        n_threads_batch=threads, logits_all=True, flash_attn=(type_k, type_v) != ("f16", "f16"),
        type_k=GGML_TYPES[type_k], type_v=GGML_TYPES[type_v], verbose=False,
    )  # fmt: skip
    try:
        start = time.perf_counter()
        wins = windows(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), ctx)
        nll = sum(llama_nll(llm, w) for w in wins)
        return _result(nll, wins, start)
    finally:
        llm.close()


def measure_torch(engine, text: str) -> Perplexity:
    """`engine` is a TorchEngine; its context length is the window."""
    start = time.perf_counter()
    wins = windows(engine.tokenize(text, special=False), engine.context_length)
    nll = sum(engine.nll(w)[0] for w in wins)
    return _result(nll, wins, start)


def _result(nll: float, wins: list[list[int]], start: float) -> Perplexity:
    n = sum(len(w) - 1 for w in wins)
    return Perplexity(math.exp(nll / n), n, time.perf_counter() - start)
