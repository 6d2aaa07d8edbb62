"""Tools the model may call: a name, a description and JSON-schema parameters (the shape of
OpenAI's function tools), and a Python function that returns text. Plugins add tools through
the `localai_register_tools` hook; a tool's failure is returned to the model as an error
string, never raised into the chat.

Chats that run the model's calls (the TUI; the plain chat and `localai run --tool`, through
repl.converse) run them through `run_call` and show them as `ToolRan.line()`. Over HTTP the
server never runs a tool: its client does (server/tool_bridge.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_ROUNDS = 4  # answer → calls → results → answer ...; a model stuck calling is cut off here
MAX_SHOWN = 200  # characters of a tool's result a chat shows (the model gets all of it)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., str]
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def schema(self) -> dict:
        """The OpenAI `tools` entry for this tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def call(self, arguments: dict) -> str:
        try:
            return str(self.fn(**arguments))
        except Exception as e:  # a tool's bug or bad arguments from the model: tell the model
            return f"error: {type(e).__name__}: {e}"


@dataclass(frozen=True)
class ToolRan:
    """A call the model made (a function's name, its arguments), and what running it returned."""

    name: str
    arguments: dict
    result: str

    def line(self, mark: str = "") -> str:
        """The call (between two `mark`s) and the start of its result, as a chat shows them."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        short = self.result if len(self.result) <= MAX_SHOWN else self.result[:MAX_SHOWN] + "…"
        return f"{mark}{self.name}({args}){mark} → {short}"


def run_call(tools: dict[str, Tool], name: str, arguments: dict) -> ToolRan:
    """Run the call to `name` among `tools` (name → Tool); an unknown name is an error result."""
    tool = tools.get(name)
    result = tool.call(arguments) if tool else f"error: there is no tool named {name!r}"
    return ToolRan(name, arguments, result)
