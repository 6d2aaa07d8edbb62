"""`localai serve`: one process that holds the engine (and, when built, the document index and
its watcher) and serves the OpenAI- and Ollama-compatible HTTP API.

Order of start: refuse an unsafe bind → bind the port (fail fast if taken, before a slow model
load) → token → engine → app → uvicorn on the bound socket. On shutdown running generations are
cancelled and waited for before the engine is closed, so the engine is never freed mid-token.

The model is held by a ResidentEngine (keepalive.py): loaded at start, unloaded after
`keep_alive` without requests and reloaded by the next one. Two background threads give memory
back: the keeper (idle unloads; with `idle_exit_s`, the exit of a daemon nobody uses, for one
the TUI started) and the pressure watch (pressure.py).
"""

from __future__ import annotations

import re
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from rich.markup import escape

from .config import ConfigError, Settings
from .durations import describe
from .governor import Governor, Shrinkable
from .keepalive import ResidentEngine
from .pressure import PressureWatch
from .runtime import (
    engine_loader,
    model_layout,
    model_passage_tokens,
    open_catalog,
    open_embedder,
    open_index,
    passage_spans_file,
)
from .server.app import build_app
from .server.auth import ensure_token, is_loopback
from .server.guard import HostNames
from .server.protocol import KEEP_ALIVE_S, MAX_HEAD_BYTES, connection_budget, limited_protocol
from .server.residency import Keeper
from .server.state import ServerState
from .terminal import shown


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {e.strerror}; is another `localai serve` running? "
            "Pick another port with --port."
        ) from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _model_meta(settings: Settings, info: dict) -> dict:
    """Size, digest and details of the loaded model, as Ollama's /api/tags reports them."""
    if info.get("backend") == "remote":  # nothing here: the server holds the model
        details = {"parent_model": "", "format": "remote", "family": "", "families": [],
                   "parameter_size": "", "quantization_level": ""}  # fmt: skip
        return {"size": 0, "digest": "", "details": details}
    path = Path(info["path"])
    quant = re.search(r"(I?Q\d_K_[SML]|I?Q\d_K|Q\d_\d|BF16|F16|F32)", path.name, re.I)
    digest = ""
    try:
        spec = open_catalog(settings).spec(info["model"])
        digest = next((f.sha256 for f in spec.files if f.name == path.name), "")
    except Exception:  # noqa: BLE001  (a .gguf path outside the catalog has no recorded digest)
        pass
    stamp = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat().replace("+00:00", "Z")
    details = {"parent_model": "", "format": "gguf", "family": info.get("arch", ""),
               "families": [info.get("arch", "")], "parameter_size": "",
               "quantization_level": quant.group(1).upper() if quant else ""}  # fmt: skip
    return {"size": path.stat().st_size, "digest": digest, "modified_at": stamp,
            "details": details}  # fmt: skip


def serve(
    settings: Settings,
    host: str,
    port: int,
    model: str | None = None,
    auth: bool = True,
    log=print,
    progress=None,
    access_log: bool = False,
    idle_exit_s: float | None = None,
) -> None:
    """Run the daemon until interrupted (Ctrl-C / SIGTERM, `localai stop`), or until no request
    came for `idle_exit_s` (None: never; the TUI starts its daemon with one)."""
    if not auth and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without a token: anyone who can reach this address "
            "could use the model. Drop --no-auth, or bind to 127.0.0.1."
        )
    sock = bind(host, port)
    try:
        key = ensure_token(settings.home)  # with or without auth, the daemon proves itself by it
        token = key if auth else None
        governor = Governor(settings.ram_budget_bytes)
        loader = engine_loader(settings, model, progress=progress, log=log, governor=governor)
        engine = ResidentEngine(loader, settings.keep_alive_s, governor, log)
    except BaseException:
        sock.close()
        raise
    state = ServerState(engine, settings.embed_model, lambda: open_embedder(settings))
    state.governor = governor
    state.keeper = keeper = Keeper(engine, idle_exit_s, None, log)
    state.proof_key = key
    state.model_meta[engine.name] = _model_meta(settings, engine.info())
    watcher = _open_docs(state, settings, governor, log)
    app = build_app(state, token, HostNames(host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="off",
                            timeout_graceful_shutdown=5, ws="none",
                            http=limited_protocol(connection_budget()),
                            timeout_keep_alive=KEEP_ALIVE_S,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES)  # fmt: skip
    where = f"http://{host}:{port}"
    log(
        f"serving {engine.name} on {where} (OpenAI: {where}/v1, Ollama: {where}); "
        + ("token in " + str(settings.home / "token") if token else "auth OFF (loopback only)")
        + f"; the model unloads after {describe(settings.keep_alive_s)} without requests"
        + (f", the daemon exits after {describe(idle_exit_s)}" if idle_exit_s is not None else "")
    )
    server = _Server(config, on_exit=state.slot.cancel_all)
    keeper.request_exit = server.stop
    pressure = PressureWatch(governor, settings, log)
    keeper.start()
    pressure.start()
    try:
        server.run(sockets=[sock])
    finally:
        keeper.stop()
        pressure.stop()
        if watcher is not None:
            watcher.stop()
        state.slot.close()
        if state.index is not None:
            state.index.close()
        engine.close()
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn, but Ctrl-C / SIGTERM first cancels running generations: their clients get a
    properly ended answer at once, instead of the shutdown waiting for long answers to end."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """Exit as on SIGTERM, from any thread, but with status 0: uvicorn re-raises a signal
        it handled once it has shut down."""
        self._on_exit()
        self.should_exit = True


def _open_docs(state: ServerState, settings: Settings, governor: Governor, log):
    """Open the index, the RAG answerer and the watcher; without them the API still serves."""
    try:
        from .rag.answer import Answerer

        index = open_index(settings, governor)
    except Exception as e:  # noqa: BLE001  (a broken index must not take the API down)
        state.rag_missing = f"the document index could not be opened: {e}"
        log(f"[yellow]{state.rag_missing}[/yellow]")
        return None
    state.index = index
    governor.register(Shrinkable("passage_cache", "caches", index.drop_caches, index.cache_bytes))
    state.load_embedder = lambda: index.embedder  # one MiniLM for the index and /v1/embeddings
    name = state.engine.name
    state.rag = Answerer(index, state.engine, model_layout(name),
                         passage_tokens=model_passage_tokens(name),
                         spans_file=passage_spans_file(settings, name))  # fmt: skip
    watcher = Watcher(index, log)
    state.on_source_added = lambda _path: watcher.restart()
    state.index_progress = lambda: dict(watcher.progress)
    watcher.start()
    return watcher


class Watcher:
    """Catches the index up with every source, then follows file changes, on one thread.
    A new source restarts it (the file watcher only follows the roots it started with)."""

    def __init__(self, index, log):
        self.index, self.log = index, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # what the index pane shows: the run in progress (catching up, or files just saved)
        self.progress = {"running": False, "done": 0, "total": 0, "chunks": 0}

    def _report(self, done: int, total: int, chunks: int) -> None:
        self.progress = {"running": True, "done": done, "total": total, "chunks": chunks}

    def _idle(self, _stats=None) -> None:
        self.progress = dict(self.progress, running=False)

    def _failed(self, e: Exception, retry_in: float | None) -> None:
        from .index.watcher import failure

        self._idle()
        self.log(f"[yellow]{escape(shown(failure(e, retry_in)))}[/yellow]")

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True,
                                        name="index-watcher")  # fmt: skip
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        """Catch up, then watch; a failure of either (another writer holding the database,
        a full disk) is logged and the whole is tried again, RETRY seconds apart."""
        from .index.watcher import RETRY

        failures = 0
        while not stop.is_set():
            try:
                if self.index.sources():
                    try:
                        st = self.index.update(progress=self._report)
                    finally:
                        self._idle()
                    self.log(f"index up to date: {st.files:,} files, {st.chunks:,} passages")
                self.index.watch(stop, on_update=self._idle, progress=self._report,
                                 on_error=self._failed)  # fmt: skip
                return
            except Exception as e:  # noqa: BLE001  (logged; the API keeps serving)
                delay = RETRY[min(failures, len(RETRY) - 1)]
                failures += 1
                self._failed(e, delay)
                stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def restart(self) -> None:
        with self._lock:
            self.stop()
            self.start()
