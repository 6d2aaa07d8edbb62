"""llama.cpp backend (llama-cpp-python) for dense GGUF models.

We drive `Llama.generate` (token by token) rather than `create_completion`: the shared loop in
tokengen.py owns stop strings, UTF-8 boundaries, limits, cancellation and stats, identically for
every backend, and skips the completion wrapper's per-token bookkeeping. The KV prefix of the
previous request is reused by llama-cpp-python when a new prompt starts with the same tokens;
fixed prefixes (prefix.py) are snapshots of sequence 0's KV, taken and put back through
llama.cpp's per-sequence state calls (KV only: no logits, unlike Llama.save_state, whose
copy of the logits alone would be 180 MB for a 300-token prefix of a 150k-token vocabulary).
Kept passages (pieces.py) move KV within the cache through a second sequence: a range of
sequence 0 is copied to sequence 1 to be saved alone, and a saved range is read into sequence 1,
shifted to its new position (llama.cpp rotates the keys) and copied into sequence 0; the cache is
unified, so a copy shares cells instead of duplicating them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from . import gguf_meta
from .base import EngineError, SamplingParams
from .tokengen import TokenEngine, Vocab, shared_prefix

GGML_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
              "q4_0": llama_cpp.GGML_TYPE_Q4_0}  # fmt: skip
BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml block sizes


class LlamaCppEngine(TokenEngine):
    backend = "llama"
    moves_kv = True

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
        super().__init__()
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
        self._two_sequences()
        self.threads, self.type_k, self.type_v = threads, type_k, type_v
        self.vocab = Vocab(self._llm)

    def _two_sequences(self) -> None:
        """Give the context a second sequence over one unified cache (the module docstring):
        llama-cpp-python makes a one-sequence context and takes no option for it."""
        llm = self._llm
        llm.context_params.n_seq_max = 2
        llm.context_params.kv_unified = True
        llm._ctx.close()
        llm._ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params,
                                           verbose=False)  # fmt: skip

    @property
    def _mem(self):
        return llama_cpp.llama_get_memory(self._llm._ctx.ctx)

    def _arch(self) -> str:
        return self._llm.metadata.get("general.architecture", "llama")

    def _token_stream(self, tokens: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        self._llm.set_seed(seed)
        self.reused = min(shared_prefix(self._llm._input_ids, tokens), len(tokens) - 1)
        return self._llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            reset=True,  # llama-cpp-python still reuses the KV of a shared prompt prefix
        )

    def forget(self) -> None:
        self._llm.reset()

    def _live_ids(self) -> list[int]:
        return self._llm._input_ids.tolist()

    def _prefill_only(self, tokens: list[int]) -> None:
        self._llm.reset()
        self._llm.eval(tokens)  # eval drops the cache past n_tokens (0) first

    def _snapshot(self, seq: int = 0) -> bytes:
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
        return bytes(buf)[:n]

    def _read(self, data: bytes, seq: int, what: str) -> None:
        """Replace sequence `seq`'s KV with snapshot bytes."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self._llm._ctx.ctx, buf, len(data), seq) != len(data):
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            raise EngineError(f"a saved {what} does not fit this context")

    def _restore(self, tokens: list[int], data: bytes) -> None:
        llm = self._llm
        llm.reset()
        llama_cpp.llama_memory_clear(self._mem, True)
        self._read(data, 0, "prompt prefix")
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)

    def _cut_live(self, n: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, -1, n, -1)
        self._llm.n_tokens = n

    def _extend(self, tokens: list[int]) -> None:
        self._llm.eval(tokens)  # at n_tokens; the scores it keeps are the stream's to overwrite

    def _range_bytes(self, a: int, b: int) -> bytes:
        mem = self._mem
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, a, b)
        try:
            return self._snapshot(1)
        finally:
            llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)

    def _put_range(self, data: bytes, was: int, at: int, run: list[int]) -> None:
        mem, llm = self._mem, self._llm
        self._read(data, 1, "passage")
        if at != was:
            llama_cpp.llama_memory_seq_add(mem, 1, -1, -1, at - was)
        llama_cpp.llama_memory_seq_cp(mem, 1, 0, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
        llm.input_ids[at : at + len(run)] = run
        llm.n_tokens = at + len(run)

    def prefix_identity(self) -> dict:
        """What makes a KV snapshot valid for this engine besides the model and the tokens."""
        return {"backend": self.backend, "type_k": self.type_k, "type_v": self.type_v,
                "llama_cpp": llama_cpp.__version__}  # fmt: skip

    def _kv_bytes(self, n_tokens: int) -> int:
        return int(self.kv_bytes_per_token() * n_tokens)

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
            "passage_kv": self.pieces.usage(),  # passages' KV kept on disk (pieces.py)
        }

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None
