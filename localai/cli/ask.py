"""`localai ask`: answers from your documents, through the daemon when it runs, else in-process
(rag/answer.py), with citations checked against the files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..engine import Message
from ..rag.prompt import LAYOUTS
from ..runtime import open_engine
from .app import find_daemon, log, main, progress_bars, settings_of, user_errors


@main.command()
@click.argument("question")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-k", type=click.IntRange(1, 50), default=8, show_default=True,
              help="Passages to retrieve.")  # fmt: skip
@click.option("--source", type=click.Path(exists=True), help="Only use documents under PATH.")
@click.option("--layout", type=click.Choice(list(LAYOUTS)),
              help="Prompt layout (default: the model's, from the catalog).")  # fmt: skip
@click.option("-m", "--model", help="Chat model (default: the daemon's, or settings).")
@click.option("-t", "--temperature", type=float, default=0.2, show_default=True)
@click.option("--seed", type=int)
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--no-daemon", is_flag=True, help="Load the model here even if a daemon runs.")
@click.pass_context
@user_errors
def ask(ctx, question, as_json, k, source, layout, model, temperature, seed, max_tokens,
        no_daemon):  # fmt: skip
    """Answer QUESTION from your indexed documents, with citations checked against the files."""
    from ..engine import Delta, Done, SamplingParams

    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens)
    source = str(Path(source).absolute()) if source else None
    from ..index import IndexError_
    from ..rag.answer import Found, NoQuestion

    docs = {"k": k, "source": source, "layout": layout}
    docs = {key: v for key, v in docs.items() if v is not None}
    events, close = _ask_events(ctx, question, params, docs, model, no_daemon)
    try:
        for ev in _user_facing(events, (NoQuestion, IndexError_)):
            if isinstance(ev, Found) and not as_json and ev.sources.get("passages"):
                log(reading(ev.sources))
            elif isinstance(ev, Delta) and not as_json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Done) and as_json:
                stats = ev.stats.as_dict() | {"sources": ev.sources}
                cits = [c.as_dict() for c in ev.citations]
                click.echo(json.dumps({"answer": ev.answer, "citations": cits, "stats": stats}))
            elif isinstance(ev, Done):
                sys.stdout.write("\n")
    finally:
        events.close()
        close()


def reading(found: dict) -> str:
    """One line, shown before the answer starts: which passages the model is reading."""
    from rich.markup import escape

    given = found["passages"]
    where = ", ".join(f"[{p['n']}] {p['where']}" for p in given[:4])
    more = f" and {len(given) - 4} more" if len(given) > 4 else ""
    return f"[dim]reading {len(given)} passage(s): {escape(where)}{more}[/dim]"


def _user_facing(events, errors):
    """`events`, with the RAG pipeline's refusals turned into one-line CLI errors."""
    try:
        yield from events
    except errors as e:
        raise click.ClickException(str(e)) from e


def _ask_events(ctx, question, params, docs, model, no_daemon):
    """(events, close): through the daemon when it runs, else in-process; `docs` is the request's
    "docs" object ({"k", "source", "layout"}), read the same way in both."""
    s = settings_of(ctx, model=model)
    d = None if no_daemon else find_daemon(s, "answering here instead")
    if d is not None and model in (None, d.model):
        msgs = [Message("user", question)]
        return d.generate(msgs, None, params, docs=docs), lambda: None
    from ..rag.answer import Answerer
    from ..rag.answer import ask as ask_local
    from ..runtime import model_layout, model_passage_tokens, open_index, passage_spans_file

    index = open_index(s)
    with progress_bars() as bars:
        engine = open_engine(s, progress=bars, log=log)

    def close():
        engine.close()
        index.close()

    layout = LAYOUTS[docs["layout"]] if "layout" in docs else model_layout(engine.name)
    rag = Answerer(index, engine, layout, passage_tokens=model_passage_tokens(engine.name),
                   spans_file=passage_spans_file(s, engine.name))  # fmt: skip
    return ask_local(rag, question, params, docs["k"], docs.get("source")), close
