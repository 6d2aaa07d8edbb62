"""What every in-process GGUF backend shares: the vocabulary and chat template (read through
llama-cpp-python, so that all backends turn the same text into the same tokens), and the
generation loop around a backend's stream of sampled tokens.

A backend subclasses TokenEngine and supplies `_token_stream` (prefill, then one sampled token
per `next()`; it is closed as soon as the loop stops, so it never computes a step nobody reads)
and `_kv_bytes`. The loop owns everything else, identically for every backend: the context
check (never truncate), one generation at a time, end-of-generation tokens, stop strings and
UTF-8 boundaries (TextStreamer), max_tokens, cancellation and the stats.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator

import llama_cpp

from . import chat_template
from .base import Clock, Delta, Done, EngineError, Event, Message, SamplingParams, check_fits
from .textstream import TextStreamer

_MARKUP_TAG = re.compile(rb"</?[A-Za-z_][A-Za-z0-9_]*>")


def shared_prefix(cached, tokens) -> int:
    """How many leading tokens two sequences have in common."""
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n


class Vocab:
    """Tokenizer side of a GGUF, from a llama_cpp.Llama (a full model or `vocab_only=True`)."""

    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        self.metadata = llm.metadata
        self.template = self.metadata.get("tokenizer.chat_template")
        self.bos = self.piece(llm.token_bos())
        self.eos = self.piece(llm.token_eos())
        self._vocab = llm._model.vocab

    def piece(self, token: int) -> str:
        """A token's text with control tokens spelled out ("" for none)."""
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        add_bos = special and not (self.bos and text.startswith(self.bos))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token adds to the answer. Control tokens add nothing, except
        markup tags such as `<tool_call>` or `<think>` (no `|`), which some models write as
        one token and which the answer's parsers need to see."""
        out = self.llm.detokenize([token])
        if not out:
            piece = self.llm.detokenize([token], special=True)
            if _MARKUP_TAG.fullmatch(piece):
                return piece
        return out

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools=None
    ) -> str:
        return chat_template.render(
            self.template, messages, self.bos, self.eos, add_generation_prompt, tools
        )


class TokenEngine:
    """Engine protocol over a backend's token stream; see the module docstring."""

    name: str
    context_length: int
    vocab: Vocab

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reused = 0  # prompt tokens of the current request whose KV was already cached

    def _token_stream(self, tokens: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        raise NotImplementedError

    def _kv_bytes(self, n_tokens: int) -> int:
        raise NotImplementedError

    def _extra_stats(self, since: dict | None) -> dict:
        """Engine-specific stats of one request (GenerationStats.extra); `since` is what
        `_extra_stats(None)` returned when the request began."""
        return {}

    def forget(self) -> None:
        """Drop the cached KV: the next prompt is computed from its first token."""
        raise NotImplementedError

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.vocab.tokenize(text, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.vocab.detokenize(tokens)

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        return self.vocab.render(messages, add_generation_prompt, tools)

    def supports_tools(self) -> bool:
        return chat_template.knows_tools(self.vocab.template)

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
            yield from self._loop(tokens, params, cancel)
        finally:
            self._lock.release()

    def _loop(self, tokens: list[int], params: SamplingParams, cancel) -> Iterator[Event]:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4))
        limit = self.context_length - len(tokens)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        clock, streamer = Clock(), TextStreamer(params.stop)  # the clock includes prefill
        before = self._extra_stats(None)
        n_out, finish = 0, "length"
        self.reused = 0  # the stream sets it when it prefills
        stream = self._token_stream(tokens, params, seed)
        try:
            for tok in stream:
                clock.token()
                if self.vocab.is_eog(tok):
                    finish = "stop"
                    break
                n_out += 1
                delta = streamer.push(self.vocab.token_bytes(tok))
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
            stream.close()
        tail = streamer.finish()
        if tail:
            yield Delta(tail)
        stats = clock.stats(
            len(tokens),
            n_out,
            finish,
            kv_bytes=self._kv_bytes(len(tokens) + n_out),
            cached_tokens=self.reused,
            extra=self._extra_stats(before),
        )
        yield Done(streamer.text, stats)
