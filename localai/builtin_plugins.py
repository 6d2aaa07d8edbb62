"""localai's own hook implementations: built-ins register through the same hooks as plugins."""

from __future__ import annotations

import datetime

from .hookspecs import hookimpl
from .tools import Tool


def _now(timezone: str = "local") -> str:
    if timezone == "UTC":
        return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@hookimpl
def localai_register_tools(register):
    register(
        Tool(
            name="current_time",
            description="The current date and time (ISO 8601), local or UTC.",
            fn=_now,
            parameters={
                "type": "object",
                "properties": {"timezone": {"type": "string", "enum": ["local", "UTC"]}},
            },
        )
    )


@hookimpl
def localai_register_loaders(register):
    from .index.loaders import register_builtins

    register_builtins(register)
