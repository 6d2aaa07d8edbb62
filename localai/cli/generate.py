"""`localai run` and `localai chat`: text generation from the terminal."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from .. import plugins
from ..engine import Delta, Done, Message, SamplingParams, chat
from ..repl import Answer, chat_loop, converse, engine_answer
from ..tools import Tool, ToolRan
from .app import (
    engine_from_flags,
    engine_options,
    err,
    find_daemon,
    main,
    sampling_options,
    settings_of,
    user_errors,
)


@main.command()
@click.argument("prompt", required=False)
@engine_options
@sampling_options
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text and stats.")
@click.option("--no-daemon", is_flag=True, help="Load the model here even if a daemon runs.")
@click.option("-T", "--tool", "tool_names", multiple=True, metavar="NAME",
              help="Let the model call this plugin tool (again for more; 'all' for every one): "
              "the calls run here, the model answers from their results.")  # fmt: skip
@click.pass_context
@user_errors
def run(ctx, prompt, model, engine, context_length, threads, type_k, type_v, system,
        temperature, top_p, top_k, seed, max_tokens, stop, raw, as_json, no_daemon,
        tool_names):  # fmt: skip
    """One-shot completion of PROMPT (or stdin), streamed to stdout."""
    if prompt in (None, "-"):
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT or pipe one on stdin")
        prompt = sys.stdin.read()
    tools = _chosen_tools(tool_names, raw)
    params = SamplingParams(temperature, top_p, top_k, seed=seed, max_tokens=max_tokens,
                            stop=list(stop))  # fmt: skip
    msgs = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    shaped = _shaped(ctx, engine, context_length, threads, type_k, type_v)
    daemon = None if no_daemon or shaped else _daemon_for(ctx, model)
    if daemon is not None:  # one copy of the model in RAM: the daemon's
        eng = None
        if tools:  # the daemon says which calls the model made; they run here
            events = converse(_daemon_answer(daemon, params), msgs, tools)
        else:
            events = daemon.generate(None if raw else msgs, prompt if raw else None, params)
    else:
        eng = engine_from_flags(ctx, model, engine, context_length, threads, type_k, type_v)
        if raw:
            events = eng.generate(prompt, params)
        elif tools:
            events = converse(engine_answer(eng, params), msgs, tools)
        else:
            events = chat(eng, msgs, params)
    name = daemon.model if daemon is not None else eng.name
    ran: list[ToolRan] = []
    try:
        for ev in events:
            if isinstance(ev, Delta) and not as_json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, ToolRan):
                ran.append(ev)
                if not as_json:
                    err.print(ev.line(), style="dim", markup=False, highlight=False)
            elif isinstance(ev, Done):
                if as_json:
                    out = {"model": name, "text": ev.text, "stats": ev.stats.as_dict()}
                    if tools:
                        out["tool_calls"] = [dataclasses.asdict(r) for r in ran]
                    click.echo(json.dumps(out))
                else:
                    sys.stdout.write("\n")
                    st = ev.stats
                    err.print(
                        f"[dim]{st.prompt_tokens} prompt + {st.completion_tokens} tokens, "
                        f"{st.tokens_per_s:.1f} tok/s, ttft {st.ttft_s:.2f}s, "
                        f"finish: {st.finish_reason}[/dim]"
                    )
    finally:
        events.close()
        if eng is not None:
            eng.close()


def _chosen_tools(names: tuple[str, ...], raw: bool) -> dict[str, Tool]:
    """The plugin tools `--tool` names (name → Tool); a name no plugin registers is refused."""
    if not names:
        return {}
    if raw:
        raise click.UsageError("--tool needs the chat template: it cannot go with --raw")
    have = plugins.tools()
    if "all" in names:
        return have
    unknown = [n for n in names if n not in have]
    if unknown:
        raise click.UsageError(f"no tool named {', '.join(unknown)}; the plugins register: "
                               f"{', '.join(have) or 'none'} (`localai plugins`)")  # fmt: skip
    return {n: have[n] for n in names}


def _daemon_answer(daemon, params: SamplingParams) -> Answer:
    """An `Answer` from the daemon (a Ctrl-C closes the stream, which stops the daemon's answer:
    the cancel event is not needed)."""

    def answer(messages: list[Message], offered: list[dict] | None, cancel=None):
        return daemon.generate(messages, None, params, tools=offered)

    return answer


def _shaped(ctx, *flags) -> bool:
    """Whether the command line shapes the engine (then the daemon's will not do)."""
    return any(x is not None for x in flags) or bool(ctx.obj.get("kv_bits"))  # --kv-bits etc.


def _daemon_for(ctx, model):
    """The running daemon if it serves `model` (or no model was named), else None."""
    d = find_daemon(settings_of(ctx), "running the model here instead")
    return d if d is not None and model in (None, d.model) else None


@main.command("chat")
@engine_options
@sampling_options
@click.option("--plain", is_flag=True, help="The plain line chat instead of the TUI.")
@click.option("--no-daemon", is_flag=True,
              help="The plain chat: load the model here even if a daemon runs.")  # fmt: skip
@click.pass_context
@user_errors
def chat_cmd(ctx, model, engine, context_length, threads, type_k, type_v, system,
             temperature, top_p, top_k, seed, max_tokens, stop, plain, no_daemon):  # fmt: skip
    """Chat: the TUI at a terminal (a client of the daemon, started if needed); the plain
    streaming line chat with --plain or when input is piped (/help for commands), through the
    daemon when one serves the model."""
    if not plain and sys.stdin.isatty() and sys.stdout.isatty() and _has_tui():
        from localai_tui.app import run as run_tui

        flags = {"--engine": engine, "--ctx": context_length, "--threads": threads,
                 "--type-k": type_k, "--type-v": type_v}  # fmt: skip
        flags["--remote-url"] = ctx.obj.get("kv_bits", {}).get("remote_url")
        serve_args = [str(x) for k, v in flags.items() if v is not None for x in (k, v)]
        params = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                  "max_tokens": max_tokens, "stop": list(stop)}  # fmt: skip
        return run_tui(settings_of(ctx), model, system or "", serve_args, params)
    params = SamplingParams(temperature, top_p, top_k, seed=seed, max_tokens=max_tokens,
                            stop=list(stop))  # fmt: skip
    daemon = None if no_daemon or _shaped(ctx, engine, context_length, threads, type_k,
                                          type_v) else _daemon_for(ctx, model)  # fmt: skip
    if daemon is not None:  # one copy of the model in RAM: the daemon's
        answer = _daemon_answer(daemon, params)
        return chat_loop(daemon.model, answer, daemon.supports_tools(), system, err,
                         plugins.tools())  # fmt: skip
    eng = engine_from_flags(ctx, model, engine, context_length, threads, type_k, type_v)
    try:
        chat_loop(eng.name, engine_answer(eng, params), eng.supports_tools(), system, err,
                  plugins.tools())  # fmt: skip
    finally:
        eng.close()


def _has_tui() -> bool:
    import importlib.util

    return importlib.util.find_spec("localai_tui") is not None
