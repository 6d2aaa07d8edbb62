"""Tools the model may call: a name, a description and JSON-schema parameters (the shape of
OpenAI's function tools), and a Python function that returns text. Plugins add tools through
the `localai_register_tools` hook; a tool's failure is returned to the model as an error
string, never raised into the chat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
