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

import bisect
import itertools
import os
import re
import threading
from collections.abc import Iterator

import llama_cpp

from . import chat_template
from .base import Clock, Delta, Done, EngineError, Event, Message, SamplingParams, check_fits
from .pieces import Pieces, PieceUse
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
        self.pieces = Pieces()  # passages' KV kept across requests (pieces.py)

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

    # -- kept passages (pieces.py): a backend that can move KV within its cache sets moves_kv ---
    moves_kv = False

    def _cut_live(self, n: int) -> None:
        """Drop the cache's KV past its first n tokens."""
        raise NotImplementedError

    def _extend(self, tokens: list[int]) -> None:
        """Compute `tokens` after the cache's live tokens."""
        raise NotImplementedError

    def _range_bytes(self, a: int, b: int) -> bytes:
        """The KV of live positions [a, b) as bytes."""
        raise NotImplementedError

    def _put_range(self, data: bytes, was: int, at: int, run: list[int]) -> None:
        """Append the KV of `run` (bytes of a range computed at position `was`) at position `at`
        (the live length); raises EngineError if it does not fit."""
        raise NotImplementedError

    def keep_pieces(self, prompt: list[int], texts: list[str]) -> None:
        """Register the tokens of `prompt` that lie wholly inside each of `texts` (passages) as
        runs whose KV is kept once computed and put back into any later prompt that holds them
        (pieces.py). Runs are taken from the whole prompt's tokens, not from each text's own
        (a tokenizer may spell a text's edges differently alone), and end before the text's last
        word: how that word is split can depend on what follows it (".\n" is one token in some
        vocabularies), and a run must be spelled the same wherever the passage lands."""
        if not prompt or self.pieces.disk is None:
            return  # nowhere to keep them (or a backend that cannot put them back)
        spelled = [self.vocab.token_bytes(t) for t in prompt]
        begins = list(itertools.accumulate((len(b) for b in spelled[:-1]), initial=0))
        ends = [b + len(s) for b, s in zip(begins, spelled, strict=True)]
        text_of_prompt = b"".join(spelled)
        runs = []
        for text in texts:
            start = text_of_prompt.find(text.encode("utf-8"))
            if start >= 0:
                end = start + len(text[: max(text.rfind(" "), text.rfind("\n"), 0)].encode())
                first = bisect.bisect_left(begins, start)  # tokens wholly inside [start, end)
                last = bisect.bisect_right(ends, end)
                runs.append(prompt[first:last])
        self.pieces.register(runs)

    def _bring_pieces(self, tokens: list[int], start: int) -> PieceUse:
        """Place the registered runs that `tokens` holds after `start` into the cache: stored
        ones put back at their position here, the others computed (with what lies between) and
        stored. The rest of the prompt is left to the token stream."""
        use = PieceUse()
        found = self.pieces.find(tokens, start)
        if not found:
            return use
        at = min(shared_prefix(self._live_ids(), tokens), len(tokens) - 1)
        at = min([at] + [a for a, b in found if a < at < b])  # a run half live is redone whole
        # a run already live stays as it is; the prompt's last token is the stream's to compute
        found = [(a, b) for a, b in found if a >= at and b < len(tokens)]
        if not found:
            return use
        self._cut_live(at)
        fresh = []
        for a, b in found:
            got = self.pieces.load(tokens, a, b)
            if got is None:
                fresh.append((a, b))
                continue
            if a > at:
                self._extend(tokens[at:a])
                use.computed += a - at
            try:
                self._put_range(got[1], got[0], a, tokens[a:b])
            except EngineError:  # e.g. a full context: computed with the next gap instead
                fresh.append((a, b))
                at = a
                continue
            use.loaded += b - a
            at = b
        end = max((b for _, b in fresh), default=at)
        if end > at:
            self._extend(tokens[at:end])
            use.computed += end - at
        for a, b in fresh:
            self.pieces.save(tokens, a, b, self._range_bytes(a, b))
        return use

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
        pieces = self._bring_pieces(tokens, fixed.n)
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
        cached = self.reused - (fixed.n if fixed.source == "computed" else 0) - pieces.computed
        stats = clock.stats(
            len(tokens),
            n_out,
            finish,
            kv_bytes=self._kv_bytes(len(tokens) + n_out),
            cached_tokens=cached,
            extra=self._extra_stats(before) | _cache_stats(len(tokens), cached, fixed, pieces),
        )
        yield Done(streamer.text, stats)


def _cache_stats(prompt: int, cached: int, fixed: Use, pieces: PieceUse) -> dict:
    """Where a request's prompt KV came from: `cached_from` the fixed prefix (restored from
    `prefix_source`), stored passages (pieces.py) and the previous request's KV (the same
    passages, the turns before)."""
    from_prefix = fixed.n if fixed.source not in ("", "computed") else 0
    before = cached - from_prefix - pieces.loaded
    return {"prefill_tokens": prompt - cached,
            "cached_from": {"prefix": from_prefix, "passages": pieces.loaded,
                            "previous_request": before},
            "prefix_tokens": fixed.n, "prefix_source": fixed.source or "none"}  # fmt: skip
