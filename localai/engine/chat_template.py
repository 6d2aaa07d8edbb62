"""Render a model's own chat template (GGUF `tokenizer.chat_template`, Jinja2) to a prompt.

Shared by every backend so that the llama.cpp and torch runners build byte-identical prompts
from the same messages. Templates run in Jinja's sandbox: they come from model files.
"""

from __future__ import annotations

import datetime
import json
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import toolcall
from .base import EngineError, Message

# Used when a GGUF carries no template: ChatML, which the catalog's models speak.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def knows_tools(template: str | None) -> bool:
    """Whether a template renders a `tools` list (so tool definitions go through it)."""
    return bool(template) and "tools" in template


def _as_dict(m: Message, native_tools: bool) -> dict:
    """A message as templates expect it (tool-call arguments as objects, as HF templates do).
    Templates with no notion of tools see calls as the tagged text the model wrote and tool
    results as user turns."""
    d = {"role": m.role, "content": m.content}
    if m.tool_calls and native_tools:
        d["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]  # fmt: skip
    elif m.tool_calls:
        blocks = [
            f"{toolcall.OPEN}{json.dumps({'name': c.name, 'arguments': c.arguments})}"
            f"{toolcall.CLOSE}"
            for c in m.tool_calls
        ]
        d["content"] = "\n".join([m.content, *blocks]).strip()
    if m.role == "tool":
        if native_tools:
            d["name"] = m.name or ""
        else:
            d = {"role": "user", "content": f"Result of {m.name or 'the tool'}: {m.content}"}
    return d


def render(
    template: str | None,
    messages: list[Message],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    for m in messages:
        if m.role not in ("system", "user", "assistant", "tool"):
            raise EngineError(f"unknown message role {m.role!r}")
    native = knows_tools(template)
    dicts = [_as_dict(m, native) for m in messages]
    extra = {}
    if tools and native:
        extra["tools"] = tools
    elif tools:  # offer them in the system message
        offer = toolcall.tools_system(tools)
        if dicts and dicts[0]["role"] == "system":
            dicts[0] = {"role": "system", "content": dicts[0]["content"] + "\n\n" + offer}
        else:
            dicts.insert(0, {"role": "system", "content": offer})
    try:
        return _compile(template or CHATML).render(
            messages=dicts,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except TemplateError as e:
        raise EngineError(f"the model's chat template refused these messages: {e}") from e
