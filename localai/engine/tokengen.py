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
from .prefix import Prefixes, Use
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
        self.prefixes = Prefixes()  # fixed prompt heads kept across requests (prefix.py)

    def _token_stream(self, tokens: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        raise NotImplementedError

    def _kv_bytes(self, n_tokens: int) -> int:
        raise NotImplementedError

    def _extra_stats(self, since: dict | None) -> dict:
        """Engine-specific stats of one request (GenerationStats.extra); `since` is what
        `_extra_stats(None)` returned when the request began."""
        return {}

    def forget(self) -> None:
        """Drop the cached KV: the next prompt is computed from its first token, unless it starts
        with a kept prefix (`prefixes.clear()` drops those)."""
        raise NotImplementedError

    # -- fixed prefixes (prefix.py): a backend that can snapshot its KV supplies these four ----
    def _live_ids(self) -> list[int]:
        """The tokens whose KV the cache holds now, in order."""
        raise NotImplementedError

    def _prefill_only(self, tokens: list[int]) -> None:
        """Empty the cache, then compute exactly `tokens` into it."""
        raise NotImplementedError

    def _snapshot(self) -> bytes:
        """The cache's KV as bytes (it holds exactly a registered prefix when this is called)."""
        raise NotImplementedError

    def _restore(self, tokens: list[int], data: bytes) -> None:
        """Replace the cache with a snapshot of `tokens`; raises EngineError if it does not fit."""
        raise NotImplementedError

    def keep_prefix(self, tokens: list[int]) -> None:
        """Register a fixed prompt head: a prompt that starts with it never computes it again
        while this engine lives (nor, with a disk store, in the next process)."""
        self.prefixes.register(tokens)

    def _bring_prefix(self, tokens: list[int]) -> Use:
        """Put the longest registered prefix of `tokens` into the cache unless it is there."""
        fixed = self.prefixes.longest_for(tokens)
        try:
            live = self._live_ids()
        except NotImplementedError:  # a backend that cannot snapshot its cache
            return Use()
        if fixed is None:
            return Use()
        if shared_prefix(live, fixed) == len(fixed):
            return Use(len(fixed), "live")
        data, where = self.prefixes.snapshot_of(fixed)
        if data is not None:
            try:
                self._restore(list(fixed), data)
                return Use(len(fixed), where)
            except EngineError:  # e.g. a file from a context too small: compute it afresh
                pass
        self._prefill_only(list(fixed))
        self.prefixes.keep(fixed, self._snapshot())
        return Use(len(fixed), "computed")

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
        fixed = self._bring_prefix(tokens)  # inside the clock: a computed prefix is this TTFT's
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
        cached = self.reused - (fixed.n if fixed.source == "computed" else 0)
        stats = clock.stats(
            len(tokens),
            n_out,
            finish,
            kv_bytes=self._kv_bytes(len(tokens) + n_out),
            cached_tokens=cached,
            extra=self._extra_stats(before) | _cache_stats(len(tokens), cached, fixed),
        )
        yield Done(streamer.text, stats)


def _cache_stats(prompt: int, cached: int, fixed: Use) -> dict:
    """Where a request's prompt KV came from: `cached_from` the fixed prefix (restored from
    `prefix_source`) and the previous request's KV (the same passages, the turns before)."""
    from_prefix = fixed.n if fixed.source not in ("", "computed") else 0
    return {"prefill_tokens": prompt - cached,
            "cached_from": {"prefix": from_prefix, "previous_request": cached - from_prefix},
            "prefix_tokens": fixed.n, "prefix_source": fixed.source or "none"}  # fmt: skip
