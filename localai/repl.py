"""The plain terminal chat (`localai chat`): streaming answers, history, a few slash commands,
and the plugins' tools (the calculator, the clock ...) when the model's template takes tools:
the model's calls are run here and shown, and it answers from their results (`converse`, which
`localai run --tool` uses too).

Ctrl-C during an answer stops that answer and keeps the conversation; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rich.console import Console

from .engine import (
    ContextOverflowError,
    Delta,
    Done,
    Engine,
    EngineError,
    Message,
    SamplingParams,
)
from .engine.toolcall import Splitter
from .tools import MAX_ROUNDS, Tool, ToolRan, run_call

# one answer streamed (Delta ..., Done) for (messages, the tools offered or None, a cancel event
# or None): an engine's (`engine_answer`) or the daemon's (cli/generate.py)
Answer = Callable[[list[Message], "list[dict] | None", "threading.Event | None"], Iterator]
FENCE = '"' * 3  # a message between two fences may span lines
HELP = f"""{FENCE}         start or end a multi-line message
/help       this list
/system S   set the system prompt (clears history)
/reset      forget the conversation
/tools X    let the model call tools (on), or not (off); /tools alone lists them
/exit       leave (or Ctrl-D)"""


def chat_loop(name: str, answer: Answer, takes_tools: bool, system: str | None,
              console: Console, tools: dict[str, Tool] | None = None) -> None:  # fmt: skip
    """Chat with model `name` until Ctrl-D or /exit; `answer` streams each answer (an engine's:
    `engine_answer`; or the daemon's). `tools` (name → Tool) are offered to the model while
    they are on: from the start when its template has a place for them (`takes_tools`)."""
    with contextlib.suppress(ImportError):  # line editing and history at the prompt, if there
        import readline  # noqa: F401
    history: list[Message] = [Message("system", system)] if system else []
    tools = tools or {}
    tools_on = bool(tools) and takes_tools
    extra = f" — tools on ({', '.join(tools)})" if tools_on else ""
    console.print(f"[bold]{name}[/bold]{extra} — /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = _read_message()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return
            if cmd == "/help":
                console.print(HELP)
            elif cmd == "/reset":
                history = [m for m in history if m.role == "system"]
                console.print("[dim]conversation cleared[/dim]")
            elif cmd == "/system":
                history = [Message("system", arg)] if arg else []
                console.print("[dim]system prompt set; conversation cleared[/dim]")
            elif cmd == "/tools" and arg in ("on", "off", ""):
                tools_on = arg == "on" and bool(tools) if arg else tools_on
                names = ", ".join(tools) or "none installed"
                console.print(f"[dim]tools ({names}): {'on' if tools_on else 'off'}[/dim]")
            else:
                console.print(f"[red]unknown command {cmd}[/red]; /help lists them")
            continue
        history.append(Message("user", line))
        added = _answer(answer, history, console, tools if tools_on else {})
        if added is None:
            history.pop()
        else:
            history += added


def _read_message() -> str:
    """One message: a line, or everything between two lines of triple quotes."""
    line = input(">>> ")
    if not line.strip().startswith(FENCE):
        return line
    lines = [line.strip()[len(FENCE) :]]
    while not lines[-1].rstrip().endswith(FENCE):
        lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[: -len(FENCE)]
    return "\n".join(lines).strip("\n")


def _answer(answer: Answer, history, console, tools) -> list[Message] | None:
    """Stream one answer; the messages it adds to the history (None: stopped or refused)."""
    cancel = threading.Event()
    events = converse(answer, history, tools, cancel) if tools else answer(history, None, cancel)
    mid_line = False
    try:
        for ev in events:
            if isinstance(ev, Delta):
                print(ev.text, end="", flush=True)
                mid_line = not ev.text.endswith("\n")
            elif isinstance(ev, ToolRan):
                if mid_line:
                    print()
                console.print(ev.line(), style="dim", markup=False, highlight=False)
                mid_line = False
            elif isinstance(ev, Done):
                print()
                st = ev.stats
                console.print(f"[dim]{st.completion_tokens} tokens, {st.tokens_per_s:.1f} tok/s, "
                              f"{st.prompt_tokens} in context[/dim]")  # fmt: skip
                return ev.messages if isinstance(ev, TurnDone) else [Message("assistant", ev.text)]
    except KeyboardInterrupt:
        cancel.set()
        events.close()  # frees the engine now, not when the generator is collected
        print()
        console.print("[dim]stopped[/dim]")
        return None
    except ContextOverflowError as e:
        console.print(f"[red]{e}[/red] Use /reset to start a new conversation.")
        return None
    except EngineError as e:  # e.g. the daemon refused or went away: the chat goes on
        console.print(f"[red]{e}[/red]")
        return None
    return None


@dataclass
class TurnDone(Done):
    """The end of a turn with tools: `text` is the last answer, `messages` every message the
    turn adds to the conversation (the calls, their results, the last answer)."""

    messages: list[Message] = field(default_factory=list)


def converse(
    answer: Answer, messages: list[Message], tools: dict[str, Tool], cancel=None
) -> Iterator[Delta | ToolRan | TurnDone]:
    """One assistant turn for `messages` in which the model may call `tools` (name → Tool),
    run here. `answer` streams one answer with the tools offered, its calls as tagged
    blocks. Delta events carry text (never part of a call block: toolcall.Splitter), a ToolRan
    follows each call run, and a TurnDone ends the turn with the last answer's stats. The
    results go back to the model as `tool` messages, up to MAX_ROUNDS answers (a model still
    calling after them ends its turn on the last results)."""
    offer = [t.schema() for t in tools.values()]
    turn: list[Message] = []
    for _ in range(MAX_ROUNDS):
        split = Splitter(tools)
        with contextlib.closing(answer(messages + turn, offer, cancel)) as events:
            for ev in events:
                if isinstance(ev, Delta):
                    shown = split.feed(ev.text)
                    if shown:
                        yield Delta(shown)
                elif isinstance(ev, Done):
                    done = ev
        rest, calls = split.finish()
        if rest:
            yield Delta(rest)
        text = split.text[: split.shown] + rest
        if not calls or done.stats.finish_reason == "cancelled":
            turn.append(Message("assistant", text))
            break
        turn.append(Message("assistant", text.strip(), tool_calls=tuple(calls)))
        for call in calls:
            ran = run_call(tools, call.name, call.arguments)
            yield ran
            turn.append(Message("tool", ran.result, name=call.name))
    yield TurnDone(text, done.stats, turn)


def engine_answer(engine: Engine, params: SamplingParams) -> Answer:
    """An `Answer` from an engine in this process: the model's template renders the messages
    and the offered tools."""

    def answer(messages: list[Message], offered: list[dict] | None, cancel=None) -> Iterator:
        prompt = engine.apply_chat_template(messages, tools=offered)
        return engine.generate(prompt, params, cancel)

    return answer
