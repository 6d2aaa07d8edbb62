"""Tools in the chat: the TUI runs on the user's machine beside localai, so it offers the model
localai's plugin tools (the calculator, the clock ...) and runs the calls the model makes, the
way any OpenAI client does: the daemon only says which calls the model asked for."""

from __future__ import annotations

import json

import anyio

MAX_ROUNDS = 4  # answer → calls → results → answer ...; a model stuck calling is cut off here
MAX_SHOWN = 200  # characters of a tool's result shown in the chat (the model gets all of it)


def available() -> dict:
    """name → localai.tools.Tool for every tool localai's plugins register; {} without localai."""
    try:
        from localai import plugins
    except ImportError:
        return {}
    try:
        return plugins.tools()
    except Exception:  # a plugin system that fails must not stop the chat: no tools, then
        return {}


async def run(tools: dict, call: dict) -> tuple[str, str]:
    """(the result for the model, a line for the chat) of one OpenAI tool-call entry."""
    fn = call.get("function") or {}
    name = fn.get("name", "")
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        args = None
    tool = tools.get(name)
    if tool is None:
        result = f"error: there is no tool named {name!r}"
    elif not isinstance(args, dict):
        result = "error: the arguments are not a JSON object"
    else:
        result = await anyio.to_thread.run_sync(tool.call, args)
    shown_args = ", ".join(f"{k}={v!r}" for k, v in (args or {}).items())
    short = result if len(result) <= MAX_SHOWN else result[:MAX_SHOWN] + "…"
    return result, f"\n\n`{name}({shown_args})` → {short}\n\n"
