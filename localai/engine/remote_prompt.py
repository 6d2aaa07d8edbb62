"""Prompts for a remote engine: how the Engine protocol's strings and token lists carry a chat to a
server that applies its own template.

The protocol renders a chat to a prompt string (`apply_chat_template`), may tokenize it to check
the context (the daemon's routes do), and hands the string or the ids to `generate`. A remote
server must get the messages, not our rendering, so that its own template (and its own tool-call
parser) runs. So the remote engine's prompt string is a ChatPrompt: a str whose text is the
server's rendering (or an estimate, counted but never sent) and which carries the messages; its
`tokenize` returns PromptTokens: the ids, carrying the prompt they came from. Both behave as the
str and list every caller expects.
"""

from __future__ import annotations

import json
import math

from .base import Message
from .toolcall import CLOSE, OPEN, forced_prefix

BYTES_PER_TOKEN = 3  # estimate without the server's tokenizer: high, so overflows are caught


class ChatPrompt(str):
    """A chat for /v1/chat/completions; `prefix` is text the assistant's turn must start with
    (a forced tool call, see toolcall.forced_prefix), sent as the request's `tool_choice`."""

    messages: list[dict]
    tools: list[dict] | None
    prefix: str
    ids: list[int] | None  # its tokens, when the server sent them with its rendering

    def __new__(cls, text: str, messages: list[dict], tools=None, prefix: str = "", ids=None):
        self = super().__new__(cls, text)
        self.messages, self.tools, self.prefix, self.ids = messages, tools, prefix, ids
        return self

    def __add__(self, other):  # the daemon appends a forced prefix to the rendered prompt
        if not isinstance(other, str):
            return NotImplemented
        if not other:
            return self
        return ChatPrompt(str(self) + other, self.messages, self.tools, self.prefix + other)

    def tool_choice(self) -> str | dict:
        """The OpenAI `tool_choice` that `prefix` stands for."""
        if not self.prefix:
            return "auto"
        if self.prefix == forced_prefix("required"):
            return "required"
        name = json.loads(self.prefix[len(OPEN) :] + "}}")["name"]  # a named function's prefix
        return {"type": "function", "function": {"name": name}}


class PromptTokens(list):
    """Token ids (or, `estimated`, a list as long as the estimate) and the prompt they are of."""

    def __init__(self, ids, prompt: str, estimated: bool):
        super().__init__(ids)
        self.prompt, self.estimated = prompt, estimated


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def openai_messages(messages: list[Message]) -> list[dict]:
    """Messages in the OpenAI shape; a tool result names the call it answers (`tool_call_id`, the
    id of the latest call to that function), as strict servers require."""
    out: list[dict] = []
    ids: dict[str, str] = {}
    for m in messages:
        d: dict = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [c.openai() for c in m.tool_calls]
            ids.update({c.name: c.id for c in m.tool_calls})
        if m.role == "tool":
            d["tool_call_id"] = ids.get(m.name or "", "call_0")
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


def rough_render(messages: list[dict], tools: list[dict] | None) -> str:
    """The chat in ChatML, the most common layout: what is counted when the server cannot render
    its own template. Never sent."""
    parts = []
    if tools:
        parts.append(f"<|im_start|>system\n{json.dumps(tools)}<|im_end|>\n")
    for m in messages:
        calls = json.dumps(m["tool_calls"]) if m.get("tool_calls") else ""
        parts.append(f"<|im_start|>{m['role']}\n{m.get('content') or ''}{calls}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


class CallCollector:
    """Tool calls streamed in OpenAI fragments (by index: id, name, then pieces of the
    arguments), turned at the end into the tagged blocks localai's own engines write, so the same
    parser (toolcall.Splitter, in the daemon's tool bridge) reads them for every engine."""

    def __init__(self) -> None:
        self.calls: dict[int, dict] = {}

    def add(self, fragments: list[dict] | None) -> None:
        for f in fragments or []:
            call = self.calls.setdefault(f.get("index", len(self.calls)), {"name": "", "args": ""})
            fn = f.get("function") or {}
            call["name"] += fn.get("name") or ""
            call["args"] += fn.get("arguments") or ""

    def text(self, prefix: str = "") -> str:
        """The blocks, less `prefix` when they start with it (the daemon already put the prefix
        at the start of the assistant's turn, and parses what follows it)."""
        blocks = []
        for call in self.calls.values():
            try:
                args = json.loads(call["args"] or "{}")
            except json.JSONDecodeError:
                args = call["args"]  # kept as written: the parser leaves a bad call as text
            body = json.dumps({"name": call["name"], "arguments": args}, ensure_ascii=False)
            blocks.append(f"{OPEN}\n{body}{CLOSE}")
        text = "\n".join(blocks)
        return text[len(prefix) :] if prefix and text.startswith(prefix) else text
