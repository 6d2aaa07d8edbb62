"""Tool calls in a model's output, in the tagged-JSON form the catalog's chat models are trained
on: `<tool_call>{"name": "...", "arguments": {...}}</tool_call>`, one block per call.

`parse(text, names)` splits a finished answer into its visible text and its calls. Small models
often drop the tags and answer with the bare JSON object (`{"name": ..., "arguments": ...}`, or
a list of them): an answer that is nothing but such JSON, naming offered tools, is a call too.
`Splitter` does the same for a stream: it passes text through as it comes and holds back from
the first `<tool_call>` on (and any tail that could be the start of one, and an answer that
starts like JSON), so a client never sees half a call as text. A block whose JSON does not
parse, or names no function, stays text: the client sees what the model wrote instead of a call
that was never made.

Templates that know nothing of tools get the tool list as a system message (`tools_system`),
in the same format, so every chat model is at least asked the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        """The OpenAI `tool_calls` entry (arguments as a JSON string)."""
        fn = {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}
        out = {"id": self.id, "type": "function", "function": fn}
        return out if index is None else {"index": index} | out

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def _call(body: str) -> ToolCall | None:
    try:
        return _from_obj(json.loads(body))
    except json.JSONDecodeError:
        return None


def _from_obj(obj: object) -> ToolCall | None:
    """A call from parsed JSON `{"name": ..., "arguments": {...}}`; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def _bare(text: str, names: frozenset[str]) -> list[ToolCall]:
    """The calls an answer makes when it is only call JSON naming offered tools; else []."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_from_obj(o) for o in items]
    if not calls or any(c is None or c.name not in names for c in calls):
        return []
    return calls


def parse(text: str, names=()) -> tuple[str, list[ToolCall]]:
    """(text outside the call blocks, the calls). Unparseable blocks stay in the text; with
    the offered tool `names`, an answer that is only bare call JSON is a call too."""
    bare = _bare(text.strip(), frozenset(names)) if names and OPEN not in text else []
    if bare:
        return "", bare
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _call(m.group(1).strip())
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        calls.append(call)
        pos = m.end()
    kept.append(text[pos:])
    return ("".join(kept).strip() if calls else text), calls


class Splitter:
    """Streamed text in, the part safe to show out; `finish()` gives the rest and the calls."""

    def __init__(self, names=()) -> None:
        self.text = ""
        self.shown = 0
        self.names = tuple(names)

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.names and self.shown == 0 and self.text.lstrip()[:1] in ("", "{", "["):
            return ""  # may be a bare call: wait for the end
        cut = self.text.find(OPEN, self.shown)
        if cut < 0:  # hold back a tail that may grow into OPEN
            cut = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    cut = len(self.text) - k
                    break
        out = self.text[self.shown : max(cut, self.shown)]
        self.shown = max(cut, self.shown)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(text not yet shown, calls). With calls, the held-back text was only call blocks
        (and whitespace around them); without, it is returned as text."""
        rest, calls = parse(self.text[self.shown :], self.names)
        return ("" if calls and not rest.strip() else rest), calls


def tools_system(tools: list[dict]) -> str:
    """A system message offering `tools` (OpenAI function entries) to a model whose template
    has no place for them."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return (
        "You can call these functions when they help to answer:\n"
        + "\n".join(lines)
        + f'\nTo call one, reply with {OPEN}{{"name": "<function>", "arguments": {{...}}}}'
        + f"{CLOSE} and nothing else; its result comes back in the next message."
    )


def forced_prefix(tool_choice: object) -> str:
    """Text that starts the assistant's turn so that it must call a tool: `"required"` opens a
    call block, a named function (`{"type": "function", "function": {"name": N}}`) also writes
    its name and opens its arguments object. Empty when the model may choose."""
    if tool_choice == "required":
        return OPEN + '\n{"name": "'
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name:
            return OPEN + "\n" + json.dumps({"name": name})[:-1] + ', "arguments": {'
    return ""
