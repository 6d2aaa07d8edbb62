"""The TUI's widgets: the prompt, chat messages, and the Sources / Index / Memory panes."""

from __future__ import annotations

from pathlib import Path

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input, Markdown, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from localai.terminal import shown

HELP = """\
# localai — keys and commands

| key | does |
| --- | --- |
| Enter | send the message |
| Ctrl+J | new line in the message |
| Esc | stop the answer being written |
| Ctrl+N | new conversation |
| Ctrl+O | reopen a saved conversation |
| Ctrl+E | open the selected source in `$EDITOR` at its line |
| Tab | move between the chat, the answers and the panes |
| F1 or `/help` | this screen |
| Ctrl+Q | quit (a daemon the TUI started exits when unused) |

| command | does |
| --- | --- |
| `/system TEXT` | set the system prompt (starts a new conversation) |
| `/model NAME` | switch model (`/model` alone lists them) |
| `/docs on` / `/docs off` | answer from your indexed documents, with sources |
| `/tools on` / `/tools off` | let the model call the plugins' tools (on when it can) |
| `/add PATH` | add a folder to the index |
| `/new`, `/open` | new conversation, reopen one |
| `/quit` | leave |

Press Esc to close this screen.
"""


class PromptArea(TextArea):
    """Multi-line input: Enter sends, Ctrl+J inserts a line break."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key == "ctrl+j":
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class ChatMessage(Vertical, can_focus=True):
    """One turn. Answers keep their citations so the Sources pane can show them when focused."""

    def __init__(self, role: str, text: str = "", citations: list[dict] | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self.citations = citations or []

    def compose(self) -> ComposeResult:
        label = {"user": "you", "assistant": "localai", "system": "system"}.get(self.role, "")
        yield Static(label, classes="role")
        yield Markdown(self.text)

    @property
    def body(self) -> Markdown:
        return self.query_one(Markdown)

    def footer(self, text: str) -> None:
        self.mount(Static(text, classes="meta"))


class SourcesPane(Vertical):
    """Citations of the selected answer: `path:start-end`, verified or not, and the passage."""

    def __init__(self) -> None:
        super().__init__(id="sources")
        self.citations: list[dict] = []

    def compose(self) -> ComposeResult:
        yield OptionList(id="citations")
        yield Markdown("*Answers from your documents (`/docs on`) list their sources here.*",
                       id="passage")  # fmt: skip

    def show(self, citations: list[dict], sources: dict | None = None) -> None:
        """Show `citations`; with none, say what retrieval used (`sources`, a docs answer's
        summary) so that an answer without sources is never mistaken for one with them."""
        self.citations = citations
        opts = self.query_one("#citations", OptionList)
        opts.display = bool(citations)  # an empty list box would only take room
        opts.clear_options()
        for i, c in enumerate(citations, 1):
            mark = "✓" if c.get("verified") else "✗ unverified"
            opts.add_option(Option(f"[{i}] {location(c)} {mark}", id=str(i - 1)))
        if citations:
            # the highlight event shows its passage: the first one from a real source, so a
            # marker the answer made up is listed (flagged) but does not hide a checkable one
            real = [i for i, c in enumerate(citations) if c.get("path")]
            opts.highlighted = real[0] if real else 0
        elif sources:
            used, dropped = sources.get("used", 0), sources.get("dropped_for_context", 0)
            self.query_one("#passage", Markdown).update(
                f"**This answer cites none of the {used} passages it was given**"
                f"{f' ({dropped} more did not fit the context)' if dropped else ''}: "
                "treat it as unsupported by your documents."
            )

    def reading(self, sources: dict) -> None:
        """The passages an answer from documents is being computed from, shown at once; the
        answer's checked citations replace them when it is done."""
        self.citations = []
        self.query_one("#citations", OptionList).display = False
        lines = [f"- [{p['n']}] `{location(p)}`" for p in sources.get("passages", [])]
        self.query_one("#passage", Markdown).update(
            f"*Reading {len(lines)} passage(s); the answer's citations follow.*\n\n"
            + "\n".join(lines)
        )

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_index is not None and event.option_index < len(self.citations):
            self.show_passage(event.option_index)

    def show_passage(self, i: int):
        """Show citation `i`'s passage; returns the update to await (tests wait for it)."""
        c = self.citations[i]
        why = c.get("reason") or "the file changed or the quote was not found"
        note = "" if c.get("verified") else f"\n\n**Not verified:** {why}."
        quote = c.get("quote") or c.get("text") or ""
        return self.query_one("#passage", Markdown).update(f"`{location(c)}`\n\n> {quote}{note}")

    def selected(self) -> dict | None:
        i = self.query_one("#citations", OptionList).highlighted
        return self.citations[i] if i is not None and i < len(self.citations) else None


def location(c: dict) -> str:
    """`path:lines`, or `path p.N` for a citation of a paged document (PDF)."""
    pages = c.get("pages")
    path = shown(c.get("path", "?"))  # a name's escape sequences are shown, not acted on
    if pages:
        return f"{path} p.{pages[0]}" + (f"-{pages[1]}" if pages[1] != pages[0] else "")
    return f"{path}:{c.get('start_line', '?')}-{c.get('end_line', '?')}"


class IndexPane(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("", id="index-summary")
        yield Input(placeholder="folder to add, then Enter", id="add-folder")


class MemoryPane(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("", id="memory-text")


def gib(n: int | float | None) -> str:
    return f"{(n or 0) / 2**30:.2f} GiB" if (n or 0) >= 2**28 else f"{(n or 0) / 2**20:.0f} MiB"


def memory_text(status: dict | None, ps: dict | None, last_stats: dict) -> str:
    """What the Memory pane shows: the model and when it unloads, the RAM budget and who holds
    it, the last memory pressure, and the last speed."""
    lines = residency_lines((status or {}).get("residency"))
    mem = (status or {}).get("memory")
    if mem:
        lines.append(f"RAM budget  {gib(mem['budget_bytes'])} of {gib(mem['total_ram_bytes'])}")
        lines.append(f"held        {gib(mem['held_bytes'])}")
        for holder, n in sorted(mem.get("holders", {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"  {holder:<18} {gib(n)}")
    elif ps:
        for m in ps.get("models", []):
            lines.append(f"{m.get('name')}  {gib(m.get('size'))} (weights)")
    else:
        lines.append("the daemon does not report memory")
    if last_stats:
        lines.append("")
        lines.append(f"last answer  {last_stats.get('tokens_per_s', 0):.1f} tok/s, "
                     f"ttft {last_stats.get('ttft_s', 0):.2f}s, "
                     f"{last_stats.get('prompt_tokens', 0)} prompt tokens")  # fmt: skip
    experts = (status or {}).get("experts")
    if experts:
        lines.append(f"expert cache  {gib(experts.get('used_bytes'))} of "
                     f"{gib(experts.get('budget_bytes'))}, hit rate "
                     f"{experts.get('hit_rate', 0):.0%}, prefetch precision "
                     f"{experts.get('prefetch_precision', 0):.0%}")  # fmt: skip
    last = (mem or {}).get("last_pressure")
    if last:
        lines.append(f"memory pressure  {last.get('reason')}: freed {gib(last.get('freed_bytes'))}")
    return "\n".join(lines)


def residency_lines(residency: dict | None) -> list[str]:
    """Each model's state and its unload countdown, then the daemon's own idle exit."""
    if not residency:
        return []
    lines = []
    for m in residency.get("models", []):
        if not m.get("loaded"):
            lines.append(f"{m.get('model')}  unloaded (loads again on the next question)")
        elif m.get("in_flight"):
            lines.append(f"{m.get('model')}  loaded, answering")
        elif m.get("unloads_in_s") is None:
            lines.append(f"{m.get('model')}  loaded, kept (keep_alive -1)")
        else:
            lines.append(f"{m.get('model')}  loaded, unloads in {countdown(m['unloads_in_s'])}")
    daemon = residency.get("daemon") or {}
    if daemon.get("idle_exit_s") is not None:
        lines.append(f"daemon exits after {countdown(daemon['idle_exit_s'])} unused")
    return lines + [""] if lines else []


def countdown(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s}s"


def index_text(index: dict | None) -> str:
    if index is None:
        return "This daemon does not serve the index yet."
    lines = []
    for s in index.get("sources", []):
        lines.append(f"{s['path']}\n  {s.get('files', 0):,} files, {s.get('chunks', 0):,} chunks")
    prog = index.get("progress")
    if prog and prog.get("running"):
        lines.append(f"\nindexing: {prog.get('done', 0)}/{prog.get('total', '?')} files, "
                     f"{prog.get('chunks', 0):,} passages embedded")  # fmt: skip
    return "\n".join(lines) or "No folders indexed yet: add one below."


class HelpScreen(ModalScreen):
    BINDINGS = [("escape", "dismiss", "Close"), ("f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)


class PickScreen(ModalScreen[str | None]):
    """Pick one of `options` (value, label); Esc cancels."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text, self.options = title, options

    def compose(self) -> ComposeResult:
        with Vertical(id="pick"):
            yield Static(self.title_text, classes="role")
            yield OptionList(*[Option(label, id=value) for value, label in self.options])

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


def editor_command(editor: str, path: Path, line: int) -> list[str]:
    """`$EDITOR +LINE PATH` (understood by vi, vim, nano, emacs, micro, kak)."""
    import shlex

    return [*shlex.split(editor), f"+{line}", str(path)]
