"""The plain terminal chat (`localai chat`): streaming answers, history, a few slash commands.

Ctrl-C during an answer stops that answer and keeps the conversation; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import contextlib
import threading

with contextlib.suppress(ImportError):  # line editing and history at the prompt, where it exists
    import readline  # noqa: F401

from rich.console import Console

from .engine import ContextOverflowError, Delta, Done, Engine, Message, SamplingParams, chat

FENCE = '"' * 3  # a message between two fences may span lines
HELP = f"""{FENCE}         start or end a multi-line message
/help       this list
/system S   set the system prompt (clears history)
/reset      forget the conversation
/exit       leave (or Ctrl-D)"""


def chat_loop(engine: Engine, params: SamplingParams, system: str | None, console: Console) -> None:
    history: list[Message] = [Message("system", system)] if system else []
    console.print(f"[bold]{engine.name}[/bold] — /help for commands, Ctrl-D to leave")
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
            else:
                console.print(f"[red]unknown command {cmd}[/red]; /help lists them")
            continue
        history.append(Message("user", line))
        answer = _answer(engine, history, params, console)
        if answer is None:
            history.pop()
        else:
            history.append(Message("assistant", answer))


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


def _answer(engine, history, params, console) -> str | None:
    cancel = threading.Event()
    events = chat(engine, history, params, cancel)
    try:
        for ev in events:
            if isinstance(ev, Delta):
                print(ev.text, end="", flush=True)
            elif isinstance(ev, Done):
                print()
                st = ev.stats
                console.print(f"[dim]{st.completion_tokens} tokens, {st.tokens_per_s:.1f} tok/s, "
                              f"{st.prompt_tokens} in context[/dim]")  # fmt: skip
                return ev.text
    except KeyboardInterrupt:
        cancel.set()
        events.close()  # frees the engine now, not when the generator is collected
        print()
        console.print("[dim]stopped[/dim]")
        return None
    except ContextOverflowError as e:
        console.print(f"[red]{e}[/red] Use /reset to start a new conversation.")
        return None
    return None
