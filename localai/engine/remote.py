"""The remote engine: a model served by another machine's OpenAI-compatible server (another
localai daemon, llama.cpp's llama-server, llama-cpp-python's server, vLLM, Ollama's /v1).

It meets the Engine protocol, so run, chat, ask, the daemon, the TUI and tool calls use it as
they use an in-process engine. What differs, and why:

- A chat goes to /v1/chat/completions as messages (remote_prompt.ChatPrompt), so the server
  applies its own template and parses its own tool calls; a raw prompt goes to /v1/completions.
- The context check counts with the server's tokenizer where it offers one (`/tokenize` as
  llama-server and localai have it, `/extras/tokenize` as llama-cpp-python's server), on the
  server's own rendering of the chat (`/apply-template`) where offered. Otherwise it estimates,
  and says so: `info()` has `tokenizer` and `chat_template` ("server" or "estimate"), and an
  overflow error says its counts are estimates. A prompt is never cut to fit.
- Token counts come from the server's `usage` (asked for with stream_options.include_usage);
  without one they are counted here, and the stats say `usage_from: "estimate"`.
- Stop strings go to the server and are enforced here too (not every server honours them).
- Cancelling (the event, or closing the generator) closes the HTTP stream: the server sees its
  client leave and frees its slot. A generation is never retried (remote_http.py).
- It holds no weights and no KV cache here: 0 bytes for the memory governor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from .base import (
    Clock,
    ContextOverflowError,
    Delta,
    Done,
    EngineError,
    Event,
    Message,
    SamplingParams,
    check_fits,
)
from .remote_http import Remote
from .remote_prompt import (
    CallCollector,
    ChatPrompt,
    PromptTokens,
    estimate_tokens,
    openai_messages,
    rough_render,
)
from .textstream import TextStreamer

FINISH = {"stop": "stop", "eos": "stop", "length": "length", "tool_calls": "stop",
          "function_call": "stop"}  # fmt: skip
DEFAULTS = SamplingParams()
# a token is never shorter than one byte; a few more for BOS and a tokenizer's leading space
BOUND_SLACK = 8
# the context length a server reports, where each kind of server reports it
CONTEXT_KEYS = ("context_length", "max_model_len", "context_window")


class RemoteEngine:
    backend = "remote"

    def __init__(self, url: str, api_key: str = "", model: str = "",
                 context_length: int = 8192, log: Callable[[str], None] = print):  # fmt: skip
        self.http = Remote(url, api_key)
        try:
            card = self._pick_model(model, log)
            self.context_length, self.context_from = self._context(card, context_length)
            self._tokenize_path = self._probe_tokenizer()
            probe = {"messages": [{"role": "user", "content": "Hello"}]}
            rendered = self.http.optional("POST", "/apply-template", probe)
            self._server_template = isinstance((rendered or {}).get("prompt"), str)
        except BaseException:
            self.http.close()
            raise

    # connecting ------------------------------------------------------------------------

    def _pick_model(self, model: str, log) -> dict:
        """The model to ask for: `model` if the server lists it, else the first it lists (a
        one-model server answers to any name, but the name shown should be its own)."""
        listed = self.http.optional("GET", "/v1/models") or {}
        cards = [c for c in listed.get("data") or [] if isinstance(c, dict) and c.get("id")]
        self.name = model
        for card in cards:
            if card["id"] == model:
                return card
        if cards:
            self.name = cards[0]["id"]
            ids = ", ".join(c["id"] for c in cards)
            log(f"the model server at {self.http.url} serves {ids}; using {self.name}")
            return cards[0]
        if not model:
            raise EngineError(f"the model server at {self.http.url} lists no models; name one "
                              "with --model")  # fmt: skip
        return {}

    def _context(self, card: dict, configured: int) -> tuple[int, str]:
        """(context length, where it came from): the server's figure where it gives one."""
        for key in CONTEXT_KEYS:
            if isinstance(card.get(key), int):
                return card[key], f"server ({key})"
        if "meta" in card:  # llama-server: /props has the context it runs with
            props = self.http.optional("GET", "/props") or {}
            n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
            if isinstance(n_ctx, int):
                return n_ctx, "server (n_ctx)"
            if isinstance(card["meta"].get("n_ctx_train"), int):
                return card["meta"]["n_ctx_train"], "server (n_ctx_train)"
        return configured, "settings (the server does not report it)"

    def _probe_tokenizer(self) -> str | None:
        """The server's tokenize endpoint, or None: token counts are then estimated."""
        for path, body in (("/tokenize", {"content": "Hello", "add_special": False}),
                           ("/extras/tokenize", {"input": "Hello"})):  # fmt: skip
            answer = self.http.optional("POST", path, body)
            if isinstance((answer or {}).get("tokens"), list):
                return path
        return None

    # the Engine protocol ----------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if isinstance(text, ChatPrompt) and text.ids is not None and special:
            return PromptTokens(text.ids, text, estimated=False)  # counted when rendered
        estimated = isinstance(text, ChatPrompt) and not self._server_template
        if self._tokenize_path is None:
            return PromptTokens([0] * estimate_tokens(text), text, estimated=True)
        if self._tokenize_path == "/tokenize":
            body = {"content": str(text), "add_special": special, "parse_special": special}
        else:
            body = {"input": str(text)}
        ids = self.http.post(self._tokenize_path, body, idempotent=True)["tokens"]
        ids = [t["id"] if isinstance(t, dict) else t for t in ids]  # llama-server with_pieces
        return PromptTokens(ids, text, estimated)

    def detokenize(self, tokens: list[int]) -> str:
        if isinstance(tokens, PromptTokens):
            return str(tokens.prompt)
        if self._tokenize_path is None:
            raise EngineError(f"the model server at {self.http.url} offers no tokenizer")
        if self._tokenize_path == "/tokenize":
            return self.http.post("/detokenize", {"tokens": list(tokens)}, True)["content"]
        return self.http.post("/extras/detokenize", {"tokens": list(tokens)}, True)["text"]

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:  # fmt: skip
        msgs = openai_messages(messages)
        if not self._server_template:
            return ChatPrompt(rough_render(msgs, tools), msgs, tools)
        body = {"messages": msgs} | ({"tools": tools} if tools else {})
        rendered = self.http.post("/apply-template", body, idempotent=True)
        ids = rendered.get("tokens")  # localai's daemon counts it too: one round trip less
        return ChatPrompt(
            rendered["prompt"], msgs, tools, ids=ids if isinstance(ids, list) else None
        )

    def supports_tools(self) -> bool:
        return True  # OpenAI-compatible servers take `tools`; the server's template places them

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[Event]:  # fmt: skip
        n_prompt, text = self._check(prompt, params)
        path, body = self._request(text, params)
        clock = Clock()
        prefix = text.prefix if isinstance(text, ChatPrompt) else ""
        with self.http.stream(path, body) as events:
            yield from self._answer(events, params, cancel, clock, prefix,
                                    lambda: n_prompt or len(self.tokenize(text)))  # fmt: skip

    def info(self) -> dict:
        return {"model": self.name, "backend": self.backend, "url": self.http.url,
                "context_length": self.context_length, "context_from": self.context_from,
                "tokenizer": "server" if self._tokenize_path else "estimate",
                "chat_template": "server" if self._server_template else "estimate",
                "weights_bytes": 0, "kv_bytes_allocated": 0}  # fmt: skip

    def close(self) -> None:
        self.http.close()

    # one generation ---------------------------------------------------------------------

    def _check(self, prompt, params: SamplingParams) -> tuple[int | None, str | list[int]]:
        """(prompt tokens, or None when not counted, and what to send). A prompt refused for
        the context is refused here, before anything is sent; one whose bytes alone prove that it
        fits is not tokenized (one round trip less before the first token)."""
        if isinstance(prompt, PromptTokens):
            n, estimated, prompt = len(prompt), prompt.estimated, prompt.prompt
        elif isinstance(prompt, str):
            exact = not isinstance(prompt, ChatPrompt) or self._server_template
            bound = len(prompt.encode("utf-8")) + BOUND_SLACK
            if exact and self._tokenize_path and _fits(bound, params, self.context_length):
                return None, prompt
            tokens = self.tokenize(prompt)
            n, estimated = len(tokens), tokens.estimated
        else:
            n, estimated = len(prompt), False
        try:
            check_fits(n, params.max_tokens, self.context_length)
        except ContextOverflowError as e:
            notes = []
            if estimated and not self._tokenize_path:
                notes.append(f"token counts are estimates: {self.http.url} offers no tokenizer")
            elif estimated:
                notes.append("counted on an estimate of the server's chat template")
            if self.context_from.startswith("server"):
                notes.append(f"the context is the server's: raise it at {self.http.url}")
            else:
                notes.append(f"the context length is from {self.context_from}")
            e.args = (f"{e} ({'; '.join(notes)})",)
            raise
        return n, prompt

    def _request(self, prompt, params: SamplingParams) -> tuple[str, dict]:
        body = {"model": self.name, "stream": True, "stream_options": {"include_usage": True}}
        body |= _sampling(params)
        if isinstance(prompt, ChatPrompt):
            body["messages"] = prompt.messages
            if prompt.tools:
                body |= {"tools": prompt.tools, "tool_choice": prompt.tool_choice()}
            return "/v1/chat/completions", body
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
        return "/v1/completions", body

    def _answer(self, events, params: SamplingParams, cancel, clock: Clock, prefix: str,
                count_prompt: Callable[[], int]) -> Iterator[Event]:  # fmt: skip
        streamer, calls = TextStreamer(params.stop), CallCollector()
        usage, finish, pieces = None, "stop", 0
        for event in events:
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content") if "delta" in choice else choice.get("text")
                calls.add(delta.get("tool_calls"))
                if piece or delta.get("tool_calls"):
                    clock.token()
                if piece and not streamer.stopped:
                    pieces += 1
                    shown = streamer.push(piece.encode("utf-8"))
                    if shown:
                        yield Delta(shown)
                finish = FINISH.get(choice.get("finish_reason"), finish)
            if streamer.stopped:
                break  # leaving the block closes the stream: the server stops generating
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
        tail = streamer.finish()
        if tail:
            yield Delta(tail)
        called = calls.text(prefix) if calls.calls else ""
        if called:
            yield Delta(called)
        yield Done(streamer.text + called, self._stats(clock, usage, pieces, finish, count_prompt))

    def _stats(self, clock: Clock, usage: dict | None, pieces: int, finish: str,
               count_prompt: Callable[[], int]):  # fmt: skip
        """The server's counts; without a `usage`, the prompt counted here and one token per
        streamed piece (as llama.cpp-based servers stream)."""
        extra = {"remote_url": self.http.url, "usage_from": "server" if usage else "estimate"}
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            return clock.stats(int(usage.get("prompt_tokens") or 0),
                               int(usage.get("completion_tokens") or 0), finish,
                               cached_tokens=int(details.get("cached_tokens") or 0),
                               extra=extra)  # fmt: skip
        return clock.stats(count_prompt(), pieces, finish, extra=extra)


def _fits(n: int, params: SamplingParams, context_length: int) -> bool:
    try:
        check_fits(n, params.max_tokens, context_length)
    except ContextOverflowError:
        return False
    return True


def _sampling(params: SamplingParams) -> dict:
    """The request's sampling fields. top_k, min_p and repeat_penalty are extensions most local
    servers take and OpenAI's own API refuses: sent only when they differ from the defaults."""
    body: dict = {"temperature": params.temperature, "top_p": params.top_p}
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.stop:
        body["stop"] = params.stop
    if params.seed is not None:
        body["seed"] = params.seed
    for key in ("top_k", "min_p", "repeat_penalty"):
        if getattr(params, key) != getattr(DEFAULTS, key):
            body[key] = getattr(params, key)
    return body
