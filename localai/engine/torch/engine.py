"""TorchEngine: the Engine protocol over our own Llama/Qwen2 runner (model.py) and its paged,
quantized KV cache (kv.py).

Tokenizer and chat template are the llama.cpp backend's: llama-cpp-python opened with
`vocab_only=True` (no weights, no context work) reads the GGUF's vocabulary, so both backends
turn the same text into the same tokens and render the same prompts. The generation loop (lock,
stop strings, limits, stats) is tokengen.TokenEngine's, shared with the llama.cpp backend; this
file supplies the token stream. The KV cache is allocated once, for the whole context, when the
engine loads, and is what `kv_bytes` reports.

The cache outlives a request: a prompt that starts with tokens already in it (the next turn of
a chat, the same system prompt and documents) computes only the rest, as llama.cpp does.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import torch
from llama_cpp._utils import suppress_stdout_stderr

from ...governor import give_back_freed
from ..base import EngineError, SamplingParams
from ..tokengen import TokenEngine, Vocab, shared_prefix
from . import native
from .arch import Hparams
from .experts import parse_budget, prediction_scores
from .fit import read_shape, split_ram
from .kv import COPY_BITS, PAGE, READ_AHEAD, KVCache, KVConfig
from .model import Transformer
from .routing import TraceWriter
from .sampler import sample
from .weights import GGUFWeights

# N tokens, C chunk, V vocabulary

ATTN_BUDGET_MIN = 512  # tokens: the fp16 window (up to 256), the sink and a few pages


class TorchEngine(TokenEngine):
    backend = "torch"

    def __init__(
        self,
        path: Path,
        name: str | None = None,
        context_length: int = 8192,
        threads: int | None = None,
        k_bits: int = 16,
        v_bits: int = 16,
        kv_window: int = 128,
        k_group: int | None = None,
        v_group: int = 64,
        kv_sink: int = 32,
        v_clip: bool | None = None,
        v_rotate: bool | None = None,
        v_sym: bool | None = None,
        prefill_chunk: int = 256,
        use_native: bool = True,
        decode_threads: int | None = None,
        hparams: dict | None = None,
        expert_budget: int | float | str | None = None,
        expert_prefetch: bool = False,
        expert_policy: str = "freq",
        trace_routing: Path | None = None,
        attn_budget: int | str | None = None,
        sparse_prefill: bool = False,
        kv_budget: int | str | None = None,
        kv_dir: Path | None = None,
        kv_read_ahead: int = READ_AHEAD,
        ram_budget: int | None = None,
    ):
        super().__init__()
        self.path = Path(path)
        self.name = name or self.path.stem
        self.threads = threads or os.cpu_count() or 1
        try:
            with suppress_stdout_stderr(disable=False):  # a context-size notice we do not use
                llm = llama_cpp.Llama(
                    model_path=str(self.path), vocab_only=True, n_ctx=64, verbose=False
                )
        except ValueError as e:
            raise EngineError(f"could not read the vocabulary of {self.path}: {e}") from e
        self.vocab = Vocab(llm)
        weights = GGUFWeights(self.path, use_native)
        hp = Hparams.from_metadata(weights.metadata, llm.n_vocab())
        hp = dataclasses.replace(hp, **(hparams or {}))  # e.g. RoPE scaling the GGUF lacks
        self.hp = hp
        self.context_length = min(context_length, hp.context_length)
        # 2-bit K: groups of 64 tokens (the byte budget allows them there, not at 4 bits);
        # 4-bit K beside 2-bit V: groups of 256 (the bytes then stay under 0.2× fp16). 2-bit V:
        # rotated, symmetric (no minimum) and clipped (BENCHMARKS.md, "KV cache")
        k_group = k_group or (64 if k_bits == 2 else 256 if v_bits == 2 else 128)
        v_clip = v_bits == 2 if v_clip is None else v_clip
        pow2 = hp.head_dim & (hp.head_dim - 1) == 0
        v_rotate = v_bits == 2 and pow2 if v_rotate is None else v_rotate
        v_sym = v_rotate if v_sym is None else v_sym
        kv = KVConfig(k_bits, v_bits, kv_window, k_group, min(v_group, hp.head_dim), kv_sink,
                      v_clip, v_rotate, v_sym, score_channels=hp.head_dim // 4)  # fmt: skip
        try:  # a MoE model's experts: all in place (None), or read into a budget (experts.py)
            budget = parse_budget(attn_budget, self.context_length, "an attention budget") or 0
            if budget and budget < ATTN_BUDGET_MIN:
                raise ValueError(
                    f"an attention budget below {ATTN_BUDGET_MIN} tokens leaves no room past "
                    f"the recent window ({budget} asked)"
                )
            if kv_budget and not budget:
                raise ValueError(
                    "a KV budget needs an attention budget (--attn-budget): dense attention "
                    "reads every page at every step, so none could stay on disk"
                )
            if ram_budget is not None:
                expert_budget, kv_budget = self._split(ram_budget, kv, budget, expert_budget,
                                                       kv_budget)  # fmt: skip
            self.ram_budget = ram_budget
            self.model = Transformer(weights, hp, kv, self.context_length, expert_budget,
                                     expert_prefetch, budget, kv_budget or None,
                                     kv_dir, kv_read_ahead, expert_policy)  # fmt: skip
            self._check_pool(budget)
            self.model.sparse_prefill = sparse_prefill
        except ValueError as e:
            raise EngineError(str(e)) from e
        self.prefill_chunk = prefill_chunk
        self.decode_threads = decode_threads or self.threads
        self.trace = self._trace_to(Path(trace_routing)) if trace_routing else None

    def _split(self, ram: int, kv: KVConfig, attn_budget: int, expert_budget, kv_budget):
        """The expert and KV budgets the user did not name, from `ram`: what the governor's RAM
        budget leaves this engine (fit.split_ram, the arithmetic `localai fit` forecasts with)."""
        hp = self.hp
        kv = Transformer.kv_config(kv, attn_budget)
        # allocated, not touched: costs no RAM (kv.KVCache._store)
        kv_all = KVCache(kv, hp.n_layers, hp.n_kv_heads, hp.head_dim, self.context_length).nbytes
        shape = read_shape(self.path)
        per_expert = shape.expert_bytes // max(1, hp.n_layers * hp.n_experts)
        kv_budget = parse_budget(kv_budget, kv_all, "a KV budget")
        expert_budget = parse_budget(expert_budget, shape.expert_bytes)
        floor = hp.n_experts_used * per_expert
        kv_budget, expert_budget = split_ram(shape, ram, kv_all, bool(attn_budget), kv_budget,
                                             expert_budget, floor)  # fmt: skip
        return expert_budget, kv_budget

    def _check_pool(self, attn_budget: int) -> None:
        """With pages on disk, the pool must hold the pages one layer's step attends to."""
        cache = self.model.cache
        if cache.pages is None:
            return
        slots = cache.pages.pool.shape[0]
        need = cache.H * (attn_budget // PAGE + 1)
        if slots < need:
            raise ValueError(
                f"a KV budget that leaves {slots} pages in RAM cannot hold the {need} pages one "
                f"layer's step attends to ({cache.fixed_bytes / 2**20:.1f} MiB go to the fp16 "
                f"window, sinks, page summaries and K scales; each page is {cache.rec} bytes)"
            )

    # -- the loop ---------------------------------------------------------------------------
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Start a sequence: keep the cached prefix it shares with the last one, run the rest of
        the prompt in chunks, return the last position's logits."""
        assert tokens, "a prompt has at least one token"
        cache = self.model.cache
        # the last token always runs: its logits are the ones the prompt is for
        self.reused = cache.truncate(shared_prefix(cache.ids, tokens[:-1]))
        for i in range(self.reused, len(tokens), self.prefill_chunk):
            logits = self.model.forward(torch.tensor(tokens[i : i + self.prefill_chunk]))
        if len(tokens) - self.reused > self.prefill_chunk:  # the chunks' buffers, to the OS
            give_back_freed()
        return logits[-1]

    def step(self, token: int) -> torch.Tensor:
        """One decode step: append `token`, return the next position's logits [V]."""
        return self.model.forward(torch.tensor([token]))[-1]

    def _threads(self, n: int) -> None:
        """n threads for what follows on this thread. With the C++ kernels they are theirs
        (native/pool.cpp, whose caller never waits for a descheduled helper), and torch's own
        ops in a decode step (norms, small products) run on this thread alone: a torch op split
        across threads waits for all of them at its end, and on a busy machine every one of a
        step's ~100 ops can wait a scheduler slice (measured on 2 cores at load 3: 1.2 tokens/s
        on two threads against 37 on one). A prompt's chunks take n for torch's ops too
        (model.Transformer.threads): their attention is large (3.6 s against 6.8 s on one
        thread for a 512-token chunk at 15K)."""
        self.model.threads = n
        kernel = self.model.w.kernel
        if kernel is not None:
            kernel.set_threads(n)
        want = 1 if kernel is not None else n
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _token_stream(self, tokens: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        gen = torch.Generator().manual_seed(seed)
        history = list(tokens)
        self._threads(self.threads)
        logits = self.prefill(tokens)
        self._threads(self.decode_threads)
        while True:
            tok = sample(logits, params, gen, history)
            yield tok  # the loop closes this generator when it stops: no step is wasted
            history.append(tok)
            logits = self.step(tok)

    def forget(self) -> None:
        self.model.cache.reset()

    # -- fixed prefixes (engine/prefix.py): a cache holding exactly a prefix, as bytes -------
    def _live_ids(self) -> list[int]:
        if self.model.cache.pages is not None:  # its pages are on disk: no snapshot of them
            raise NotImplementedError
        return list(self.model.cache.ids)

    def _prefill_only(self, tokens: list[int]) -> None:
        self.forget()
        self._threads(self.threads)
        for i in range(0, len(tokens), self.prefill_chunk):
            self.model.forward(torch.tensor(tokens[i : i + self.prefill_chunk]))

    def _snapshot(self) -> bytes:
        """The filled part of every cache tensor (pages and their scales up to qend(n), the fp16
        buffer up to n, the sinks), so a restore is exact at any KV bits."""
        c = self.model.cache
        q, n = c.qend(c.n), c.n
        parts = {name: t[:, :, :end].clone() for name, t, end in _filled(c, q, n - q, c.exact_from)}
        buf = io.BytesIO()
        torch.save({"n": n, "exact_from": c.exact_from, **parts}, buf)
        return buf.getvalue()

    def _restore(self, tokens: list[int], data: bytes) -> None:
        c = self.model.cache
        try:
            saved = torch.load(io.BytesIO(data), weights_only=True)  # tensors only: no code
        except Exception as e:  # noqa: BLE001  (any damage: the caller computes it afresh)
            raise EngineError(f"a saved prompt prefix could not be read: {e}") from e
        n = saved["n"]
        if n != len(tokens) or n > c.T:
            raise EngineError("a saved prompt prefix does not fit this cache")
        c.reset()
        exact_from = saved.get("exact_from", -1)
        if exact_from < 0:
            raise EngineError("a saved prompt prefix has another cache layout")
        for name, t, end in _filled(c, c.qend(n), n - c.qend(n), exact_from):
            if name not in saved or saved[name].shape != t[:, :, :end].shape:
                raise EngineError("a saved prompt prefix has another cache layout")
            t[:, :, :end] = saved[name]  # in place: the layers hold views of these tensors
        c.adopt(tokens, exact_from)

    def prefix_identity(self) -> dict:
        """What makes a KV snapshot valid for this engine besides the model and the tokens."""
        cfg = self.model.cache.cfg
        return {"backend": self.backend, "kv": dataclasses.asdict(cfg), "torch": torch.__version__}

    def _kv_bytes(self, n_tokens: int) -> int:
        return self.model.cache.nbytes  # allocated once for the whole context

    # -- scoring (perplexity) ---------------------------------------------------------------
    def nll(self, tokens: list[int]) -> tuple[float, int]:
        """Sum of -log p(token | prefix) over tokens[1:], and how many were scored."""
        assert 1 < len(tokens) <= self.context_length
        with self._lock:
            self._threads(self.threads)
            self.model.cache.reset()
            total, count = 0.0, 0
            for i in range(0, len(tokens) - 1, self.prefill_chunk):
                chunk = tokens[i : i + self.prefill_chunk]
                logits = self.model.forward(torch.tensor(chunk), all_logits=True)  # C, V
                targets = torch.tensor(tokens[i + 1 : i + 1 + len(chunk)])
                logp = torch.log_softmax(logits[: len(targets)], dim=-1)
                total -= float(logp.gather(1, targets[:, None]).sum())
                count += len(targets)
        assert math.isfinite(total)
        return total, count

    def info(self) -> dict:
        cfg = self.model.cache.cfg
        return {
            "model": self.name,
            "path": str(self.path),
            "backend": self.backend,
            "arch": self.hp.arch,
            "context_length": self.context_length,
            "threads": self.threads,
            "k_bits": cfg.k_bits,
            "v_bits": cfg.v_bits,
            "kv_window": cfg.window,
            "native_kernel": native.status() if self.model.use_native else "off",
            "weights_bytes": self.model.weight_bytes,
            "kv_bytes_allocated": self.model.cache.nbytes,
            "kv_bytes_per_token": round(self.model.cache.bytes_per_token(), 1),
            "attn_budget": self.model.attn_budget,
            "ram_budget_bytes": self.ram_budget,
            "sparse_prefill": bool(self.model.attn_budget and self.model.sparse_prefill),
            **self._kv_pages_info(),
            **(self._moe_info() if self.hp.is_moe else {}),
        }

    def _kv_pages_info(self) -> dict:
        cache = self.model.cache
        if cache.pages is None:
            return {}
        return {"kv_pool_pages": cache.pages.pool.shape[0], "kv_page_bytes": cache.rec}

    def _trace_to(self, path: Path) -> TraceWriter:
        """Record every MoE layer's routing to `path` (routing.py)."""
        if not self.hp.is_moe:
            raise EngineError(f"{self.name} has no experts: there is no routing to trace")
        hp = self.hp
        per_expert = self._moe_info()["expert_bytes"] // (hp.n_layers * hp.n_experts)
        header = {"model": self.name, "layers": hp.n_layers, "experts": hp.n_experts,
                  "experts_used": hp.n_experts_used, "expert_bytes": per_expert}  # fmt: skip
        trace = TraceWriter(path, header)
        for b in self.model.blocks:
            b.ffn.trace = trace
        return trace

    def _moe_info(self) -> dict:
        cache = self.model.expert_cache
        return {
            "experts": self.hp.n_experts,
            "experts_used": self.hp.n_experts_used,
            "expert_bytes": sum(b.ffn.experts.nbytes for b in self.model.blocks),
            "expert_cache": cache.info() if cache else None,
        }

    def _extra_stats(self, since: dict | None) -> dict:
        """One request's decode attention (KV bytes read per token, pages selected) and, for a
        MoE model with an expert budget, its expert cache traffic (hit rate, bytes read)."""
        cache, kv = self.model.expert_cache, self.model.cache
        now = {f"attn_{k}": v for k, v in dataclasses.asdict(self.model.attn_stats).items()}
        now |= dataclasses.asdict(cache.stats) if cache is not None else {}
        if kv.pages is not None:
            hits, reads, _, _, ahead, used = kv.pages.stats()
            now |= {"kv_page_hits": hits, "kv_page_reads": reads, "kv_read_ahead": ahead,
                    "kv_read_ahead_used": used}  # fmt: skip
        if since is None:
            return now
        d = {k: now[k] - since.get(k, 0) for k in now}
        out = {"kv_resident_bytes": kv.resident_bytes()}
        if kv.pages is not None:
            out["kv_offloaded_bytes"] = kv.offloaded_bytes()
        if steps := d["attn_decode_steps"]:
            out["kv_bytes_read_per_token"] = d["attn_bytes_read"] // steps
            if kv.pages is not None:  # of those, from disk (pages that were not in the pool)
                out["kv_disk_bytes_read_per_token"] = d["kv_page_reads"] * kv.rec // steps
                # read-ahead: of the pages it read, the share a step then used (precision);
                # of the pages steps found missing or read ahead, the share read ahead (recall)
                used = d["kv_read_ahead_used"]
                out["kv_read_ahead_precision"] = round(used / max(1, d["kv_read_ahead"]), 4)
                out["kv_read_ahead_recall"] = round(used / max(1, used + d["kv_page_reads"]), 4)
        if sparse := d["attn_sparse_steps"]:
            out["attn_sparse_steps"] = sparse
            out["attn_pages_selected"] = round(d["attn_pages_selected"] / sparse, 1)
        if cache is None:
            return out
        return out | {"expert_hit_rate": round(d["hits"] / max(1, d["hits"] + d["misses"]), 4),
                      "expert_bytes_read": d["bytes_read"], "expert_cache_bytes": cache.used,
                      **(prediction_scores(d) if d["predicted"] else {})}  # fmt: skip

    def shrink_experts(self) -> int:
        """Memory pressure: the expert cache down to its floor (one token's experts per layer);
        the bytes given back (0 without a cache). Later steps read more from disk, same result."""
        cache = self.model.expert_cache if self.model is not None else None
        return cache.shrink(cache.floor) if cache is not None else 0

    def close(self) -> None:
        if getattr(self, "trace", None) is not None:
            self.trace.close()
        model = getattr(self, "model", None)
        if model is not None and model.expert_cache is not None:
            model.expert_cache.close()
        vocab = getattr(self, "vocab", None)
        if vocab is not None:
            vocab.llm.close()
            self.vocab = None
        self.model = None


def _filled(c, q: int, buffered: int, exact_from: int):
    """(name, tensor, how far along its token axis it holds the first q + buffered tokens, the
    quantized ones from `exact_from` on also held in fp16)."""
    g, held = c.cfg.k_group, q - exact_from if c.kprev.shape[2] else 0
    ends = {"kc": q, "vc": q, "kbuf": buffered, "vbuf": buffered, "kprev": held, "vprev": held,
            "ks": q // g, "km": q // g,
            "vs": q, "vm": q, "ksink": None, "vsink": None, "kcent": q // PAGE,
            "kspread": q // PAGE, "vcent": q // PAGE, "kcs": q // g, "kcm": q // g,
            "kcmu": q // g, "kcopy": q * COPY_BITS // 8}  # fmt: skip
    for name, end in ends.items():
        t = getattr(c, name)
        if name == "kcopy" and t.dim() == 4:  # [L, H, D, T/2]: its token axis last
            t = t.transpose(2, 3)
        if t.dim() == 4:  # scales and sinks are empty at 16 bits, page bounds when unused
            yield name, t, t.shape[2] if end is None else end
