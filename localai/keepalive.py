"""A model that gives its memory back: loaded when a request needs it, unloaded after
`keep_alive` without requests (Ollama's rule), or sooner when the system runs short.

ResidentEngine meets the Engine protocol, so the routes, the RAG answerer and the slot use it as
they would the engine itself; it loads the real engine on first use and closes it when told to.

    model = ResidentEngine(loader, keep_alive=300, governor=g)   # loads now (fail fast)
    model.begin()                # a request arrived (the server brackets every model request)
    model.request_keep_alive(s, given)  # that request's keep_alive, or the default: Ollama's rule
    load_s = model.ensure()      # loaded, reloading if it was unloaded; seconds it took
    ... tokenize, generate ...
    model.end()                  # the response's last byte is out: the countdown starts
    model.tick()                 # the keeper thread: unload if the countdown ran out

Invariants: the engine is never closed while a request is in flight (`in_flight` counts them,
from arrival to the last byte sent, and every unload checks it under the same lock); load and
unload never overlap (one swap lock); the model's name and context length stay known while it
is unloaded, so listing and validating requests never load it.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator

from .engine import Done, Engine
from .governor import Governor, Shrinkable
from .runtime import ENGINE_HOLDERS, reserve_engine

FOREVER = None  # keep_alive value: never unload for idleness


class ResidentEngine:
    def __init__(self, load: Callable[[], Engine], keep_alive: float | None,
                 governor: Governor | None = None, log=print):  # fmt: skip
        self._load = load
        self.default_keep_alive = keep_alive
        self.keep_alive = keep_alive  # the last request's: Ollama's "session duration"
        self.governor, self.log = governor, log
        self._engine: Engine | None = None
        self._swap = threading.Lock()  # load / unload, one at a time
        self._count = threading.Lock()  # in_flight, deadline
        self.in_flight = 0
        self._deadline: float | None = None  # time.monotonic() when it unloads; None: never
        self._unreported_load_s = 0.0  # the last load's time, for the next answer's stats
        self.loads = self.unloads = 0
        self.last_unload: dict | None = None
        self.name, self.context_length, self._info, self._tools = "", 0, {}, False
        self._running = 0  # generations on a worker thread (one may outlive its request)
        self.ensure()
        self._restart_countdown()
        if governor is not None:
            governor.register(Shrinkable("model", "models", self.shrink))

    # residency --------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def ensure(self) -> float:
        """Load the engine if it is not loaded; the seconds loading took (0 when it was)."""
        if self._engine is not None:
            return 0.0
        with self._swap:
            if self._engine is not None:
                return 0.0
            t0 = time.perf_counter()
            engine = self._load()
            info = engine.info()
            if self.governor is not None:
                try:
                    reserve_engine(self.governor, info)
                except BaseException:
                    self._release()
                    engine.close()
                    raise
            if self.governor is not None and info.get("expert_cache"):
                self.governor.register(Shrinkable("expert_cache", "experts", self.shrink_experts))
            if self.governor is not None and getattr(engine, "prefixes", None) is not None:
                heads = Shrinkable("prompt_prefixes", "caches", self.shrink_prefixes,
                                   self.prefix_bytes)  # fmt: skip
                self.governor.register(heads)
            self.name, self.context_length, self._info = engine.name, engine.context_length, info
            self._tools = engine.supports_tools()
            self._engine = engine
            load_s = time.perf_counter() - t0
            self.loads += 1
            if self.loads > 1:  # the first load is the daemon's start, not a request's
                self.log(f"loaded {self.name} again in {load_s:.2f}s")
                self._unreported_load_s = load_s
            return load_s

    def unload(self, reason: str, allow_in_flight: int = 0) -> bool:
        """Close the engine unless a request is in flight (beyond `allow_in_flight`: the
        request asking for the unload) or a generation still runs; True if it was unloaded."""
        with self._swap:
            with self._count:
                busy = self.in_flight > allow_in_flight or self._running
                if self._engine is None or busy:
                    return False
                held = self.bytes_held()
                engine, self._engine = self._engine, None
                self._deadline = None
            engine.close()
            del engine
            gc.collect()  # a cycle holding the llama.cpp context would keep its memory
            self._release()
            self.unloads += 1
            self.last_unload = {"at": time.time(), "reason": reason, "bytes": held}
        self.log(f"unloaded {self.name} ({reason}); {held / 2**20:,.0f} MiB given back")
        return True

    def _release(self) -> None:
        if self.governor is not None:
            for holder in ENGINE_HOLDERS:
                self.governor.release(holder)

    def shrink(self) -> int:
        """The governor's "idle model" stage: unload now if no request is in flight."""
        held = self.bytes_held()
        return held if self.unload("memory pressure") else 0

    def shrink_experts(self) -> int:
        """The governor's "experts" stage: the MoE expert cache down to its floor, a request in
        flight or not (it reads what it lacks again); the ledger keeps the lower budget."""
        engine = self._engine
        if engine is None or not hasattr(engine, "shrink_experts"):
            return 0
        freed = engine.shrink_experts()
        cache = engine.info().get("expert_cache")
        if cache and self.governor is not None:
            self.governor.reserve("expert_cache", cache["budget_bytes"])
        return freed

    def shrink_prefixes(self) -> int:
        """The governor's "caches" stage: the kept prompt heads' KV snapshots in RAM (RAG's
        system prompt and layout; on disk they stay, and a request holding one keeps its copy)."""
        engine = self._engine
        return engine.prefixes.drop_snapshots() if engine is not None else 0

    def prefix_bytes(self) -> int:
        engine = self._engine
        return engine.prefixes.nbytes if engine is not None else 0

    def bytes_held(self) -> int:
        if self._engine is None:
            return 0
        return int(self._info.get("weights_bytes", 0)) + int(
            self._info.get("kv_bytes_allocated", 0)
        )

    # requests ---------------------------------------------------------------------------

    def begin(self) -> None:
        with self._count:
            self.in_flight += 1
            self._deadline = None

    def request_keep_alive(self, seconds: float | None, given: bool) -> None:
        """A request's keep_alive (`given` False: it sent none, so the default applies)."""
        self.keep_alive = seconds if given else self.default_keep_alive

    def end(self) -> bool:
        """A request is done; True when this was the last one and keep_alive is 0 (the caller
        then unloads, off the event loop)."""
        with self._count:
            self.in_flight -= 1
            assert self.in_flight >= 0
            if self.in_flight:
                return False
        self._restart_countdown()
        return self.keep_alive == 0 and self.loaded

    def _restart_countdown(self) -> None:
        with self._count:
            ka = self.keep_alive
            self._deadline = None if ka is FOREVER else time.monotonic() + ka

    def tick(self) -> bool:
        """Unload if the countdown ran out with nothing in flight; True if it unloaded."""
        with self._count:
            idle = not self.in_flight and not self._running
            deadline = self._deadline
            due = self._engine is not None and idle and deadline is not None
            due = due and time.monotonic() >= deadline
        if not due:
            return False
        from .durations import describe

        return self.unload("keep_alive 0" if not self.keep_alive else
                           f"idle for {describe(self.keep_alive)}")  # fmt: skip

    def seconds_left(self) -> float | None:
        """Until the idle unload: None for never (or while a request runs, the countdown
        has not started: the value is then the full keep_alive)."""
        with self._count:
            if self.in_flight or self._deadline is None:
                return self.keep_alive
            return max(0.0, self._deadline - time.monotonic())

    def residency(self) -> dict:
        """What `ps` and `status` show about this model."""
        left = self.seconds_left() if self.loaded else None
        return {"model": self.name, "loaded": self.loaded, "in_flight": self.in_flight,
                "keep_alive_s": self.keep_alive, "unloads_in_s": left,
                "expires_at": None if left is None else time.time() + left,
                "bytes": self.bytes_held(), "loads": self.loads, "unloads": self.unloads,
                "last_unload": self.last_unload} | self._remote()  # fmt: skip

    def _remote(self) -> dict:
        """Where a remote engine's model runs (`ps` and `status` show it; never its key)."""
        url = self._info.get("url") if self._info.get("backend") == "remote" else None
        return {"remote_url": url} if url else {}

    # the Engine protocol, on the loaded engine ------------------------------------------

    def _engine_now(self) -> Engine:
        while (engine := self._engine) is None:  # an unload between the two: load again
            self.ensure()
        return engine

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._engine_now().tokenize(text, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._engine_now().detokenize(tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        return self._engine_now().apply_chat_template(messages, add_generation_prompt, tools)

    def supports_tools(self) -> bool:
        return self._tools  # known from the first load; asking must not load the model

    def keep_prefix(self, tokens: list[int]) -> None:
        """Register a fixed prompt head (engine/prefix.py) with an engine that keeps them; a
        reloaded engine finds its snapshot on disk when the next request registers it again."""
        keep = getattr(self._engine_now(), "keep_prefix", None)
        if keep is not None:
            keep(tokens)

    def keep_pieces(self, prompt: list[int], texts: list[str]) -> None:
        """Register passages whose KV is kept (engine/pieces.py) with an engine that keeps them."""
        keep = getattr(self._engine_now(), "keep_pieces", None)
        if keep is not None:
            keep(prompt, texts)

    def generate(self, prompt, params, cancel=None) -> Iterator:
        """The engine's events; the answer after a (re)load carries the load time in its
        stats (`load_s`, Ollama's `load_duration`)."""
        with self._count:
            self._running += 1
        try:
            for ev in self._engine_now().generate(prompt, params, cancel):
                if isinstance(ev, Done):
                    ev.stats.load_s = round(self._unreported_load_s, 4)
                    self._unreported_load_s = 0.0
                yield ev
        finally:
            with self._count:
                self._running -= 1

    def info(self) -> dict:
        """The loaded engine's info, or the last one's while unloaded (never loads it)."""
        engine = self._engine
        info = engine.info() if engine is not None else dict(self._info)
        return info | {"loaded": engine is not None}

    def close(self) -> None:
        with self._swap:
            engine, self._engine = self._engine, None
            if engine is not None:
                engine.close()
