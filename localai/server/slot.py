"""The generation slot: one model, one generation at a time, requests served first come first
served.

An asyncio.Lock is the queue (its waiters wake in FIFO order and a newcomer cannot jump a
waiter). The holder runs the engine's synchronous generator on one worker thread and receives its
events through an asyncio.Queue. Events are handed over in batches: the worker wakes the event
loop only when no wake-up is already pending, and consecutive text deltas that arrived together
are sent as one, so a loop that falls behind the tokens catches up with one chunk instead of
competing with the engine's threads (and the GIL) for every token.

The slot is released when the worker thread ends, not when the client goes away: a client that
disconnects sets the cancel event, the engine stops at its next token, and only then does the
next request start, so two generations never overlap on the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ..engine import Delta, Done
from ..engine.base import Event

_END = object()


class Slot:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.waiting = 0  # requests queued behind the current one (for /health)
        self.served = 0
        self.cancelled = 0  # generations stopped early because their client left
        self._active: set[threading.Event] = set()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def stream(self, start: Callable[[threading.Event], Iterator[Event]]) -> AsyncIterator:
        """Wait for the slot, then yield the events of `start(cancel)` run on the worker thread.

        Exceptions raised by the generator (e.g. ContextOverflowError) are re-raised here. When
        the consumer stops early (disconnect, cancellation), the generation is cancelled and the
        slot is freed as soon as the worker returns."""
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self._active.add(cancel)
        pending: list = []  # events the worker produced since the loop last woke
        guard = threading.Lock()

        def hand_over() -> None:  # on the event loop
            with guard:
                items = pending[:]
                pending.clear()
            for item in _merge_deltas(items):
                queue.put_nowait(item)

        def put(item) -> None:  # on the worker
            with guard:
                pending.append(item)
                if len(pending) > 1:
                    return  # a wake-up is already on its way and will take this one too
            loop.call_soon_threadsafe(hand_over)

        def work() -> None:
            try:
                events = start(cancel)
                try:
                    for ev in events:
                        put(ev)
                        if isinstance(ev, Done) and ev.stats.finish_reason == "cancelled":
                            self.cancelled += 1
                finally:
                    events.close()  # frees the engine even if we stopped early
            except BaseException as e:  # noqa: BLE001  (handed to the consumer to re-raise)
                put(e)
            finally:
                put(_END)

        try:
            future = loop.run_in_executor(self._pool, work)
        except BaseException:
            self._active.discard(cancel)
            self._lock.release()
            raise
        future.add_done_callback(lambda _f: self._release(cancel))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Done):
                    return
        finally:
            cancel.set()  # no-op after Done; stops the engine if the consumer left early

    def _release(self, cancel: threading.Event) -> None:
        self._active.discard(cancel)
        self.served += 1
        self._lock.release()

    def cancel_all(self) -> None:
        """Stop every running generation at its next token (safe from a signal handler)."""
        for cancel in list(self._active):
            cancel.set()

    def close(self) -> None:
        """Cancel what runs and wait for it, so the engine can be closed safely."""
        self.cancel_all()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _merge_deltas(items: list) -> list:
    """Consecutive Deltas joined into one (the client sees the same text in fewer chunks)."""
    out: list = []
    for item in items:
        if isinstance(item, Delta) and out and isinstance(out[-1], Delta):
            out[-1] = Delta(out[-1].text + item.text)
        else:
            out.append(item)
    return out
