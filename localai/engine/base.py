"""The Engine contract that every backend (llama.cpp, the torch runner, a remote server) meets.

An engine holds one loaded model. `generate` streams `Delta` events and ends with exactly one
`Done` carrying the whole text and the stats; it never truncates a prompt: a prompt that does not
fit the context (with room for `max_tokens`) raises ContextOverflowError before any work is done.
Cancellation is cooperative: set the `cancel` event, or close the generator; the slot is freed.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

FINISH_REASONS = ("stop", "length", "cancelled")


class EngineError(RuntimeError):
    """A request the engine cannot serve; the message is meant for the user."""


class ContextOverflowError(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int | None, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        if max_tokens:
            msg = (
                f"prompt is {prompt_tokens:,} tokens and max_tokens is {max_tokens:,} "
                f"({prompt_tokens + max_tokens:,} in all); the model context is "
                f"{context_length:,} tokens. Shorten the prompt, lower max_tokens, "
                "or raise the context length (--ctx)."
            )
        else:
            msg = (
                f"prompt is {prompt_tokens:,} tokens; the model context is {context_length:,} "
                "tokens, which leaves no room for an answer. Shorten the prompt or raise --ctx."
            )
        super().__init__(msg)


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    max_tokens: int | None = 512  # None: until the context is full
    stop: list[str] = field(default_factory=list)
    repeat_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise EngineError(f"min_p must be in [0, 1), not {self.min_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, not {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, not {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start → first generated token (prefill + one step)
    tokens_per_s: float = 0.0  # decode rate after the first token
    prefill_tokens_per_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = "stop"
    kv_bytes: int = 0
    peak_rss_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the previous request
    # what only some engines measure, flat in as_dict (the torch runner's MoE expert cache:
    # expert_hit_rate, expert_bytes_read, ...)
    extra: dict = field(default_factory=dict)
    load_s: float = 0.0  # loading the model for this request (after an idle unload)

    def as_dict(self) -> dict:
        d = asdict(self)
        return d | d.pop("extra")


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    text: str
    stats: GenerationStats


Event = Delta | Done


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple = ()  # toolcall.ToolCall, on an assistant message that called tools
    name: str | None = None  # on a tool message: the function whose result this is


@runtime_checkable
class Engine(Protocol):
    name: str  # model name as the user knows it
    context_length: int

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids; `special` parses control tokens like <|im_start|> and adds BOS if the model
        wants one."""

    def detokenize(self, tokens: list[int]) -> str: ...

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """The model's own chat template (from its GGUF metadata) rendered to a prompt string;
        `tools` (OpenAI function entries) are offered to the model."""

    def supports_tools(self) -> bool:
        """Whether the model's own template has a place for tools."""

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]: ...

    def info(self) -> dict:
        """What is loaded: model, path, backend, context, threads, KV types, bytes held."""

    def close(self) -> None: ...


def chat(engine: Engine, messages: list[Message], params: SamplingParams, cancel=None):
    """Generate an assistant turn for `messages` with the model's chat template."""
    return engine.generate(engine.apply_chat_template(messages), params, cancel)


def check_fits(prompt_tokens: int, max_tokens: int | None, context_length: int) -> None:
    """Refuse, with both counts, a request that would not fit: never truncate silently."""
    if prompt_tokens >= context_length or (
        max_tokens is not None and prompt_tokens + max_tokens > context_length
    ):
        raise ContextOverflowError(prompt_tokens, max_tokens, context_length)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Clock:
    """Timestamps of one generation, turned into GenerationStats at the end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def stats(
        self, prompt_tokens: int, completion_tokens: int, finish: str, **kw
    ) -> GenerationStats:
        end = time.perf_counter()
        first = self.first or end
        ttft = first - self.start
        decode_s = end - first
        computed = prompt_tokens - kw.get("cached_tokens", 0)  # prompt tokens run this time
        return GenerationStats(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=round(ttft, 4),
            tokens_per_s=round((completion_tokens - 1) / decode_s, 2) if decode_s > 0 else 0.0,
            prefill_tokens_per_s=round(computed / ttft, 1) if ttft > 0 else 0.0,
            total_s=round(end - self.start, 4),
            finish_reason=finish,
            peak_rss_bytes=peak_rss_bytes(),
            **kw,
        )
