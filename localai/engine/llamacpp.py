"""llama.cpp backend (llama-cpp-python) for dense GGUF models.

We drive `Llama.generate` (token by token) rather than `create_completion`: our own loop owns
stop strings, UTF-8 boundaries, limits, cancellation and stats, identically for every backend,
and skips the completion wrapper's per-token bookkeeping. The KV prefix of the previous request
is reused by llama-cpp-python when a new prompt starts with the same tokens (chat turns).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

from . import chat_template, gguf_meta
from .base import (
    Clock,
    Delta,
    Done,
    EngineError,
    Event,
    Message,
    SamplingParams,
    check_fits,
)
from .textstream import TextStreamer

GGML_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
              "q4_0": llama_cpp.GGML_TYPE_Q4_0}  # fmt: skip
BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml block sizes


class LlamaCppEngine:
    backend = "llama"

    def __init__(
        self,
        path: Path,
        name: str | None = None,
        context_length: int = 8192,
        threads: int | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        n_batch: int = 512,
    ):
        self.path = Path(path)
        self.name = name or self.path.stem
        threads = threads or os.cpu_count() or 1
        quantized_kv = (type_k, type_v) != ("f16", "f16")
        meta = gguf_meta.read(self.path)
        self.context_length = min(context_length, int(meta.get("context_length") or context_length))
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=self.context_length,
                n_batch=n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                flash_attn=quantized_kv,  # llama.cpp needs it for a quantized V cache
                type_k=GGML_TYPES[type_k],
                type_v=GGML_TYPES[type_v],
                verbose=False,
            )
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise EngineError(f"llama.cpp could not load {self.path}: {e}") from e
        self.threads, self.type_k, self.type_v = threads, type_k, type_v
        md = self._llm.metadata
        self._template = md.get("tokenizer.chat_template")
        self._bos = self._piece(self._llm.token_bos())
        self._eos = self._piece(self._llm.token_eos())
        self._vocab = self._llm._model.vocab
        self._lock = threading.Lock()  # one generation at a time on this context

    def _arch(self) -> str:
        return self._llm.metadata.get("general.architecture", "llama")

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", "replace")

    # -- Engine protocol -------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        add_bos = special and not (self._bos and text.startswith(self._bos))
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", "replace")

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

    def _generate(self, tokens, params: SamplingParams, cancel) -> Iterator[Event]:
        llm = self._llm
        llm.set_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4)))
        limit = self.context_length - len(tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        clock = Clock()
        streamer = TextStreamer(params.stop)
        n_out, finish = 0, "length"
        steps = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            reset=True,
        )
        try:
            for tok in steps:
                clock.token()
                if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
                    finish = "stop"
                    break
                n_out += 1
                delta = streamer.push(llm.detokenize([tok]))
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
        finally:
            steps.close()
        tail = streamer.finish()
        if tail:
            yield Delta(tail)
        kv = self.kv_bytes_per_token() * (len(tokens) + n_out)
        stats = clock.stats(len(tokens), n_out, finish, kv_bytes=int(kv))
        yield Done(streamer.text, stats)

    def kv_bytes_per_token(self) -> float:
        md, arch = self._llm.metadata, self._arch()
        layers = int(md.get(f"{arch}.block_count", 0))
        heads = int(md.get(f"{arch}.attention.head_count", 1))
        kv_heads = int(md.get(f"{arch}.attention.head_count_kv", heads))
        embd = int(md.get(f"{arch}.embedding_length", 0))
        k_dim = int(md.get(f"{arch}.attention.key_length", embd // heads)) * kv_heads
        v_dim = int(md.get(f"{arch}.attention.value_length", embd // heads)) * kv_heads
        return layers * (
            k_dim * BYTES_PER_ELEMENT[self.type_k] + v_dim * BYTES_PER_ELEMENT[self.type_v]
        )

    def info(self) -> dict:
        return {
            "model": self.name,
            "path": str(self.path),
            "backend": self.backend,
            "arch": self._arch(),
            "context_length": self.context_length,
            "threads": self.threads,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "weights_bytes": self.path.stat().st_size,
            "kv_bytes_allocated": int(self.kv_bytes_per_token() * self.context_length),
        }

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None
