"""TorchEngine: the Engine protocol over our own Llama/Qwen2 runner (model.py) and its paged,
quantized KV cache (kv.py).

Tokenizer and chat template are the llama.cpp backend's: llama-cpp-python opened with
`vocab_only=True` (no weights, no context work) reads the GGUF's vocabulary, so both backends
turn the same text into the same tokens and render the same prompts. One generation runs at a
time (a lock, as in the llama.cpp backend); the KV cache is allocated once, for the whole
context, when the engine loads, and is what `kv_bytes` reports.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import torch
from llama_cpp._utils import suppress_stdout_stderr

from .. import chat_template
from ..base import Clock, Delta, Done, EngineError, Event, Message, SamplingParams, check_fits
from ..textstream import TextStreamer
from . import native
from .arch import Hparams
from .kv import KVConfig
from .model import Transformer
from .sampler import sample
from .weights import GGUFWeights

# N tokens, C chunk, V vocabulary


class TorchEngine:
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
        k_group: int = 128,
        v_group: int = 64,
        prefill_chunk: int = 256,
        use_native: bool = True,
        decode_threads: int = 1,
    ):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        try:
            with suppress_stdout_stderr(disable=False):  # a context-size notice we do not use
                self._vocab = llama_cpp.Llama(
                    model_path=str(self.path), vocab_only=True, n_ctx=64, verbose=False
                )
        except ValueError as e:
            raise EngineError(f"could not read the vocabulary of {self.path}: {e}") from e
        md = self._vocab.metadata
        weights = GGUFWeights(self.path)
        hp = Hparams.from_metadata(weights.metadata, self._vocab.n_vocab())
        self.hp = hp
        self.context_length = min(context_length, hp.context_length)
        kv = KVConfig(k_bits, v_bits, kv_window, k_group, min(v_group, hp.head_dim))
        self.model = Transformer(weights, hp, kv, self.context_length)
        self.model.use_native = use_native
        if use_native:
            native.load()
        self.prefill_chunk, self.decode_threads = prefill_chunk, decode_threads
        self._template = md.get("tokenizer.chat_template")
        self._bos = self._piece(self._vocab.token_bos())
        self._eos = self._piece(self._vocab.token_eos())
        self._lock = threading.Lock()

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._vocab.detokenize([token], special=True).decode("utf-8", "replace")

    # -- Engine protocol -------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        add_bos = special and not (self._bos and text.startswith(self._bos))
        return self._vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._vocab.detokenize(tokens).decode("utf-8", "replace")

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True
    ) -> str:
        return chat_template.render(
            self._template, messages, self._bos, self._eos, add_generation_prompt
        )

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        check_fits(len(tokens), params.max_tokens, self.context_length)
        if not self._lock.acquire(blocking=False):
            raise EngineError("this engine is already generating; requests must be queued")
        try:
            yield from self._generate(tokens, params, cancel)
        finally:
            self._lock.release()

    # -- the loop ---------------------------------------------------------------------------
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Start a new sequence: run the prompt in chunks, return the last position's logits."""
        assert tokens, "a prompt has at least one token"
        self.model.cache.reset()
        for i in range(0, len(tokens), self.prefill_chunk):
            logits = self.model.forward(torch.tensor(tokens[i : i + self.prefill_chunk]))
        return logits[-1]

    def step(self, token: int) -> torch.Tensor:
        """One decode step: append `token`, return the next position's logits [V]."""
        return self.model.forward(torch.tensor([token]))[-1]

    def _threads(self, n: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def _generate(self, tokens, params: SamplingParams, cancel) -> Iterator[Event]:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4))
        gen = torch.Generator().manual_seed(seed)
        limit = self.context_length - len(tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        clock, streamer = Clock(), TextStreamer(params.stop)
        history, n_out, finish = list(tokens), 0, "length"
        self._threads(self.threads)
        logits = self.prefill(tokens)
        # Decode matmuls are ~50 us each: a thread barrier per op costs more than it saves, and
        # on a busy machine a descheduled worker stalls every op (measured 27 ms/token on one
        # thread vs 790 ms on two while another process held a core).
        self._threads(self.decode_threads)
        while True:
            tok = sample(logits, params, gen, history)
            clock.token()
            if llama_cpp.llama_vocab_is_eog(self._vocab._model.vocab, tok):
                finish = "stop"
                break
            n_out += 1
            history.append(tok)
            delta = streamer.push(self._vocab.detokenize([tok]))
            if delta:
                yield Delta(delta)
            if streamer.stopped:
                finish = "stop"
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if n_out >= limit:
                break
            logits = self.step(tok)
        tail = streamer.finish()
        if tail:
            yield Delta(tail)
        stats = clock.stats(len(tokens), n_out, finish, kv_bytes=self.model.cache.nbytes)
        yield Done(streamer.text, stats)

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
        }

    def close(self) -> None:
        vocab = getattr(self, "_vocab", None)
        if vocab is not None:
            vocab.close()
            self._vocab = None
        self.model = None
