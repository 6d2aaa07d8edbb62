"""Function calling over HTTP: the `tools` a request offers go into the model's chat template, and
the tool-call blocks in its answer come back as structured calls (OpenAI `tool_calls` with
finish_reason "tool_calls", Ollama `message.tool_calls`). The server never runs a tool itself;
the client runs it and sends the result back as a `tool` message, as both APIs specify.

`tool_choice` "none" hides the tools, "auto" (the default) lets the model choose, "required" and
a named function start the assistant's turn inside a call block so that the model must call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from ..engine import Delta, Done, Message
from ..engine.toolcall import Splitter, ToolCall, forced_prefix
from .errors import bad_request


@dataclass
class ToolDone(Done):
    """The end of an answer that may have called tools; `text` excludes the call blocks."""

    calls: list[ToolCall] = field(default_factory=list)


def offered(body: dict) -> tuple[list[dict] | None, str]:
    """(the tools to show the model, text that starts its turn) from an OpenAI-style body."""
    tools = body.get("tools") or None
    choice = body.get("tool_choice") or "auto"
    if not tools or choice == "none":
        return None, ""
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        names = names_of(tools)
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                              f"({', '.join(names)})", param="tool_choice")  # fmt: skip
    return tools, forced_prefix(choice)


def _arguments(raw: object, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        args = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise bad_request(f"{where}: arguments must be a JSON object", param="messages")
    return args


def calls_of(message: dict, index: int) -> tuple:
    """The ToolCalls of an assistant message (OpenAI: arguments as a JSON string; Ollama: as
    an object)."""
    out = []
    for j, c in enumerate(message.get("tool_calls") or []):
        fn = c.get("function") or {}
        where = f"messages.{index}.tool_calls.{j}"
        args = _arguments(fn.get("arguments", {}), where)
        out.append(ToolCall(fn.get("name", ""), args, c.get("id") or f"call_{index}_{j}"))
    return tuple(out)


def tool_name(message: dict, earlier: list[Message]) -> str | None:
    """The function a tool message answers: named directly (Ollama `tool_name`, `name`) or
    found through `tool_call_id` among the calls made earlier in the conversation."""
    name = message.get("tool_name") or message.get("name")
    if name:
        return name
    wanted = message.get("tool_call_id")
    for m in reversed(earlier):
        for c in m.tool_calls:
            if c.id == wanted or wanted is None:
                return c.name
    return None


def names_of(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


async def with_tool_calls(inner: AsyncIterator, prefix: str, names: list[str]) -> AsyncIterator:
    """Engine events with call blocks held back from the text and parsed at the end (the
    model's text continues `prefix`, which was put at the start of its turn; `names` are the
    offered tools)."""
    split = Splitter(names)
    split.feed(prefix)
    async with aclosing(inner) as it:
        async for ev in it:
            if isinstance(ev, Delta):
                shown = split.feed(ev.text)
                if shown:
                    yield Delta(shown)
            elif isinstance(ev, Done):
                rest, calls = split.finish()
                if rest:
                    yield Delta(rest)
                text = split.text[: split.shown] + rest
                yield ToolDone(text.strip() if calls else text, ev.stats, calls)
            else:
                yield ev
