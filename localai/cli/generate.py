"""`localai run` and `localai chat`: text generation from the terminal."""

from __future__ import annotations

import json
import sys

import click

from ..engine import Delta, Done, Message, SamplingParams, chat
from .app import engine_from_flags, engine_options, err, main, sampling_options, user_errors


@main.command()
@click.argument("prompt", required=False)
@engine_options
@sampling_options
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text and stats.")
@click.pass_context
@user_errors
def run(ctx, prompt, model, engine, context_length, threads, type_k, type_v, system,
        temperature, top_p, top_k, seed, max_tokens, stop, raw, as_json):  # fmt: skip
    """One-shot completion of PROMPT (or stdin), streamed to stdout."""
    if prompt in (None, "-"):
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT or pipe one on stdin")
        prompt = sys.stdin.read()
    params = SamplingParams(temperature, top_p, top_k, seed=seed, max_tokens=max_tokens,
                            stop=list(stop))  # fmt: skip
    eng = engine_from_flags(ctx, model, engine, context_length, threads, type_k, type_v)
    try:
        if raw:
            events = eng.generate(prompt, params)
        else:
            msgs = ([Message("system", system)] if system else []) + [Message("user", prompt)]
            events = chat(eng, msgs, params)
        for ev in events:
            if isinstance(ev, Delta) and not as_json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Done):
                if as_json:
                    click.echo(json.dumps({"model": eng.name, "text": ev.text,
                                           "stats": ev.stats.as_dict()}))  # fmt: skip
                else:
                    sys.stdout.write("\n")
                    st = ev.stats
                    err.print(
                        f"[dim]{st.prompt_tokens} prompt + {st.completion_tokens} tokens, "
                        f"{st.tokens_per_s:.1f} tok/s, ttft {st.ttft_s:.2f}s, "
                        f"finish: {st.finish_reason}[/dim]"
                    )
    finally:
        eng.close()


@main.command("chat")
@engine_options
@sampling_options
@click.pass_context
@user_errors
def chat_cmd(ctx, model, engine, context_length, threads, type_k, type_v, system,
             temperature, top_p, top_k, seed, max_tokens, stop):  # fmt: skip
    """Interactive streaming chat with history (/help for commands)."""
    from ..repl import chat_loop

    params = SamplingParams(temperature, top_p, top_k, seed=seed, max_tokens=max_tokens,
                            stop=list(stop))  # fmt: skip
    eng = engine_from_flags(ctx, model, engine, context_length, threads, type_k, type_v)
    try:
        chat_loop(eng, params, system, err)
    finally:
        eng.close()
