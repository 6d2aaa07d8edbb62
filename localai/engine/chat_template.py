"""Render a model's own chat template (GGUF `tokenizer.chat_template`, Jinja2) to a prompt.

Shared by every backend so that the llama.cpp and torch runners build byte-identical prompts
from the same messages. Templates run in Jinja's sandbox: they come from model files.
"""

from __future__ import annotations

import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def render(
    template: str | None,
    messages: list[Message],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    for m in messages:
        if m.role not in ("system", "user", "assistant", "tool"):
            raise EngineError(f"unknown message role {m.role!r}")
    try:
        return _compile(template or CHATML).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as e:
        raise EngineError(f"the model's chat template refused these messages: {e}") from e
