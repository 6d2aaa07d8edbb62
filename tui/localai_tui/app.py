"""The localai TUI: chat with streaming Markdown answers, sources you can open, the index and the
memory the daemon holds. A client of the daemon's HTTP API only.

Errors from the daemon or the user's input are notifications; no traceback reaches the screen
(every worker catches and reports). An answer that is stopped keeps what was shown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Input, Static, TabbedContent, TabPane

from . import tools
from .client import Answer, ClientError, DaemonClient, Reading
from .store import Conversation, Store, Turn
from .widgets import (
    ChatMessage,
    HelpScreen,
    IndexPane,
    MemoryPane,
    PickScreen,
    PromptArea,
    SourcesPane,
    editor_command,
    index_text,
    memory_text,
)

CSS = """
#chat { width: 2fr; }
#side { width: 1fr; min-width: 28; border-left: solid $primary-background; }
#messages { height: 1fr; }
#prompt { height: 5; border: round $primary; }
.message { height: auto; margin: 0 1 1 0; padding: 0 1; }
.message:focus { background: $boost; }
.message.user { border-left: thick $secondary; }
.message.assistant { border-left: thick $success; }
.role { color: $text-muted; text-style: bold; }
.meta { color: $text-muted; }
#passage { height: 1fr; }
#citations { height: auto; max-height: 10; }
#help, #pick { width: 80%; height: 80%; margin: 2 4; background: $panel; border: round $primary; }
"""


class LocalaiApp(App):
    TITLE = "localai"
    CSS = CSS
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit"),
        Binding("escape", "stop", "Stop", show=True),
        Binding("f1", "help", "Help"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "open_chat", "Open"),
        Binding("ctrl+e", "open_source", "Edit source"),
    ]

    def __init__(self, client: DaemonClient, store: Store, model: str, system: str = "",
                 params: dict | None = None):  # fmt: skip
        super().__init__()
        self.client, self.store = client, store
        self.params = {k: v for k, v in (params or {}).items() if v not in (None, [], ())}
        self.model, self.system, self.docs = model, system, False
        self.tools = tools.available()  # tools the model may call (localai's plugins)
        self.tools_on = False  # decided per model: on when its template takes tools
        self.conv: Conversation | None = None
        self.last_stats: dict = {}
        self.answering = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield PromptArea(id="prompt", soft_wrap=True, show_line_numbers=False)
            with TabbedContent(id="side"):
                with TabPane("Sources", id="tab-sources"):
                    yield SourcesPane()
                with TabPane("Index", id="tab-index"):
                    yield IndexPane()
                with TabPane("Memory", id="tab-memory"):
                    yield MemoryPane()
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one(PromptArea).focus()
        await self._check_tools()
        self.set_interval(2.0, self.refresh_panes)
        self.refresh_panes()

    async def _check_tools(self) -> None:
        try:
            self.tools_on = bool(self.tools) and "tools" in await self.client.capabilities(
                self.model
            )
        except ClientError:
            self.tools_on = False
        self._subtitle()

    def _subtitle(self) -> None:
        extra = " + docs" if self.docs else (" + tools" if self.tools_on else "")
        self.sub_title = f"{self.model}{extra}"

    # -- sending -------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    async def submitted(self, event: PromptArea.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        self.query_one(PromptArea).clear()
        if text.startswith("/"):
            await self.command(text)
        elif self.answering:
            self.notify("Still answering: press Esc to stop it first.", severity="warning")
        else:
            await self.ask(text)

    async def ask(self, text: str) -> None:
        if self.conv is None:
            self.conv = self.store.new(self.model, self.system, self.docs)
        self.store.add(self.conv, Turn("user", text))
        box = self.query_one("#messages", VerticalScroll)
        await box.mount(ChatMessage("user", text))
        reply = ChatMessage("assistant")
        await box.mount(reply)
        box.scroll_end(animate=False)
        self.answering = True
        self.stream_answer(reply)

    def _history(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": t.role, "content": t.content} for t in self.conv.turns]

    @work(exclusive=True, group="answer", exit_on_error=False)
    async def stream_answer(self, reply: ChatMessage) -> None:
        """Stream the answer into `reply`. When the model calls tools, run them here, show each
        call and its result, send the results back and stream the rest of the answer."""
        model = f"{self.model}+docs" if self.docs else self.model
        offer = {"tools": [t.schema() for t in self.tools.values()]} if self._with_tools() else {}
        offer |= self.params  # sampling from the command line (temperature, max_tokens ...)
        stream = reply.body.get_stream(reply.body)
        messages, shown, answer = self._history(), "", Answer()
        try:
            for _ in range(tools.MAX_ROUNDS):
                async for ev in self.client.chat(model, messages, **offer):
                    if isinstance(ev, Answer):
                        answer = ev
                    elif isinstance(ev, Reading):
                        self.query_one(SourcesPane).reading(ev.sources)
                    else:
                        shown += ev
                        await stream.write(ev)
                        self.query_one("#messages", VerticalScroll).scroll_end(animate=False)
                if answer.finish_reason != "tool_calls":
                    break
                messages.append({"role": "assistant", "content": answer.text,
                                 "tool_calls": answer.tool_calls})  # fmt: skip
                for call in answer.tool_calls:
                    result, line = await tools.run(self.tools, call)
                    messages.append({"role": "tool", "tool_call_id": call["id"],
                                     "content": result})  # fmt: skip
                    shown += line
                    await stream.write(line)
        except ClientError as e:
            self.notify(str(e), title="daemon", severity="error", timeout=8)
        finally:  # also on Esc (the worker is cancelled): keep what was shown
            await stream.stop()
            answer.text = shown
            self._finish(reply, answer)

    def _with_tools(self) -> bool:
        return self.tools_on and not self.docs

    def _finish(self, reply: ChatMessage, answer: Answer) -> None:
        self.answering = False
        reply.text, reply.citations = answer.text, answer.citations
        st = answer.stats
        if st:
            self.last_stats = st
            speed = f"{st.get('tokens_per_s', 0):.1f} tok/s"
            reply.footer(
                f"{st.get('completion_tokens', 0)} tokens · {speed} · {answer.finish_reason}"
            )
        elif answer.finish_reason is None and answer.text:
            reply.footer("stopped")
        if answer.citations or answer.sources:
            self.query_one(SourcesPane).show(answer.citations, answer.sources)
        if answer.text and self.conv is not None:
            self.store.add(self.conv, Turn("assistant", answer.text, answer.citations, st))

    def action_stop(self) -> None:
        if self.answering:
            self.workers.cancel_group(self, "answer")  # closes the HTTP stream: the daemon stops

    # -- commands ------------------------------------------------------------------------
    async def command(self, text: str) -> None:
        cmd, _, arg = text.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit", "/bye"):
            self.exit()
        elif cmd == "/help":
            self.action_help()
        elif cmd == "/new":
            await self.action_new_chat()
        elif cmd == "/open":
            self.action_open_chat()
        elif cmd == "/system":
            self.system = arg
            await self.action_new_chat()
            self.notify("System prompt set; new conversation.")
        elif cmd == "/docs" and arg in ("on", "off"):
            self.docs = arg == "on"
            self._subtitle()
            self.notify(f"Answers from your documents: {arg}.")
        elif cmd == "/tools" and arg in ("on", "off"):
            self.tools_on = arg == "on" and bool(self.tools)
            self._subtitle()
            names = ", ".join(self.tools) or "none installed"
            self.notify(f"Tools the model may call ({names}): {'on' if self.tools_on else 'off'}.")
        elif cmd == "/model":
            await self.pick_model(arg)
        elif cmd == "/add" and arg:
            self.add_folder(arg)
        else:
            self.notify(f"Unknown command {text!r}: F1 lists them.", severity="warning")

    async def pick_model(self, name: str) -> None:
        try:
            names = [m for m in await self.client.models() if not m.endswith("+docs")]
        except ClientError as e:
            self.notify(str(e), severity="error")
            return
        if name:
            self._set_model(name if name in names else None, names)
            return
        self.push_screen(PickScreen("Model", [(n, n) for n in names]),
                         lambda chosen: self._set_model(chosen, names))  # fmt: skip

    def _set_model(self, name: str | None, names: list[str]) -> None:
        if name is None:
            self.notify(f"Models this daemon serves: {', '.join(names)}", severity="warning")
            return
        self.model = name
        self.run_worker(self._check_tools(), exit_on_error=False)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def action_new_chat(self) -> None:
        self.action_stop()
        self.conv = None
        await self.query_one("#messages", VerticalScroll).remove_children()
        self.query_one(SourcesPane).show([])

    def action_open_chat(self) -> None:
        rows = self.store.recent()
        if not rows:
            self.notify("No saved conversations yet.")
            return
        self.push_screen(PickScreen("Reopen a conversation",
                                    [(str(i), title or f"#{i}") for i, title, _ in rows]),
                         self._reopen)  # fmt: skip

    def _reopen(self, conv_id: str | None) -> None:
        if conv_id is not None:
            self.reopen(int(conv_id))

    @work(exclusive=True, group="reopen", exit_on_error=False)
    async def reopen(self, conv_id: int) -> None:
        await self.action_new_chat()
        self.conv = self.store.load(conv_id)
        self.model, self.system, self.docs = self.conv.model, self.conv.system, self.conv.docs
        self._subtitle()
        box = self.query_one("#messages", VerticalScroll)
        for t in self.conv.turns:
            await box.mount(ChatMessage(t.role, t.content, t.citations))
        box.scroll_end(animate=False)

    # -- panes ---------------------------------------------------------------------------
    def on_descendant_focus(self, event) -> None:
        if isinstance(event.widget, ChatMessage) and event.widget.citations:
            self.query_one(SourcesPane).show(event.widget.citations)

    def action_open_source(self) -> None:
        c = self.query_one(SourcesPane).selected()
        if c is None:
            self.notify("Select a source first (Sources pane).", severity="warning")
            return
        path = Path(c["path"])
        if not path.is_file():
            self.notify(f"{path} no longer exists.", severity="error")
            return
        if c.get("pages"):  # a PDF: not for a text editor; the desktop's viewer, if any
            viewer = shutil.which("xdg-open")
            if viewer is None:
                self.notify(f"Open {path} at page {c['pages'][0]} in your PDF viewer.")
            else:
                subprocess.Popen([viewer, str(path)], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            return
        cmd = editor_command(os.environ.get("EDITOR", "vi"), path, int(c.get("start_line", 1)))
        try:
            with self.suspend():
                subprocess.run(cmd, check=False)
        except (OSError, Exception) as e:  # no editor, or no terminal to suspend to
            self.notify(f"Could not open the editor: {e}", severity="error")

    @on(Input.Submitted, "#add-folder")
    def folder_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.add_folder(event.value.strip())
            event.input.clear()

    @work(group="index", exit_on_error=False)
    async def add_folder(self, path: str) -> None:
        folder = Path(path).expanduser().resolve()
        if not folder.exists():
            self.notify(f"{folder} does not exist.", severity="error")
            return
        try:
            await self.client.add_source(str(folder))
            self.notify(f"Indexing {folder}")
        except ClientError as e:
            self.notify(str(e), severity="error")
        self.refresh_panes()

    @work(exclusive=True, group="panes", exit_on_error=False)
    async def refresh_panes(self) -> None:
        memory = self.query_one("#memory-text", Static)
        try:
            status = await self.client.status()
            ps = None if status else await self.client.ps()
            memory.update(memory_text(status, ps, self.last_stats))
        except ClientError as e:
            memory.update(str(e))
        summary = self.query_one("#index-summary", Static)
        try:
            summary.update(index_text(await self.client.index()))
        except ClientError as e:  # e.g. the daemon has no embedding model: say why
            summary.update(str(e))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `localai-tui` (and of `localai chat` at a terminal)."""
    import argparse

    from localai.config import load_settings

    ap = argparse.ArgumentParser(prog="localai-tui")
    ap.add_argument("--home")
    ap.add_argument("--model")
    ap.add_argument("--system", default="")
    a = ap.parse_args(argv)
    run(load_settings(a.home), a.model, a.system)


def run(settings, model: str | None = None, system: str = "", serve_args=(),
        params: dict | None = None) -> None:  # fmt: skip
    """Connect to (or start, with `serve_args`) the daemon, then run the app until quit;
    `params` (OpenAI request fields: temperature, max_tokens ...) go with every question."""
    from .connect import find_or_start

    print("connecting to the localai daemon (starting one if needed)")
    try:
        ep = find_or_start(settings, model, list(serve_args))
    except RuntimeError as e:
        raise SystemExit(f"localai: {e}") from None
    client = DaemonClient(ep.url, ep.token)
    store = Store(settings.home / "conversations.db")
    try:  # the daemon may already serve another model: talk to it in the model it has
        LocalaiApp(client, store, model or ep.model or settings.model, system, params).run()
    finally:
        store.close()
