"""Tools in the chat: the TUI runs on the user's machine beside localai, so it offers the model
localai's plugin tools (the calculator, the clock ...) and runs the calls the model makes, the
way any OpenAI client does: the daemon only says which calls the model asked for."""

from __future__ import annotations

import json

import anyio

MAX_ROUNDS = 4  # answer → calls → results → answer ...; a model stuck calling is cut off here


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
    """(the result for the model, a line for the chat) of one OpenAI tool-call entry (`tools`
    come from `available()`, so localai is there)."""
    from localai.tools import ToolRan, run_call

    fn = call.get("function") or {}
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        args = None
    name = fn.get("name", "")
    if isinstance(args, dict):
        ran = await anyio.to_thread.run_sync(run_call, tools, name, args)
    else:
        ran = ToolRan(name, {}, "error: the arguments are not a JSON object")
    return ran.result, f"\n\n{ran.line('`')}\n\n"
