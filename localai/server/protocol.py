"""HTTP/1.1 as uvicorn serves it (h11), with the limits it leaves unset: how long a request may
take to arrive, and how many connections may be open at once.

uvicorn closes a keep-alive connection idle for `timeout_keep_alive` seconds, but one that has
sent nothing yet, half a request head or part of a body is kept forever; each holds a file
descriptor and needs no token. With the descriptor limit at 256, 260 such connections made
/health time out. So:
- a request must arrive whole, head and body, within REQUEST_TIMEOUT_S of its first byte (or of
  the connection being opened): a slow or stalled sender is cut off;
- at most `max_connections` are open, kept below the descriptor limit (which the daemon first
  raises to its hard limit, see `connection_budget`); one more closes the oldest connection
  still waiting for its request, or itself when every other one is busy with a request, so an
  idle crowd cannot keep a new client out, and the process never runs out of descriptors;
- a request head is at most MAX_HEAD_BYTES (h11's incomplete-event limit).
"""

from __future__ import annotations

import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT_S = 20.0  # head and body; loopback clients send theirs in milliseconds
KEEP_ALIVE_S = 5  # an idle connection between requests
MAX_HEAD_BYTES = 16 << 10
MAX_CONNECTIONS = 1024
RESERVED_FDS = 64  # model and index files, sqlite, the watcher, the listening socket


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request and a cap on connections."""

    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._opened = time.monotonic()
        self._deadline = None
        self._watch_request()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels uvicorn's keep-alive timer, parses what came
        if not self.transport.is_closing():
            self._watch_request()

    def connection_lost(self, exc) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def waiting(self) -> bool:
        """Whether a request is still to arrive whole (none begun, or its head or body open)."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _watch_request(self) -> None:
        """Start the deadline when a request is to arrive; stop it once it has arrived. The
        idle wait after a response is uvicorn's keep-alive timer, so data starts this one."""
        if not self.waiting():
            self._stop_deadline()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(REQUEST_TIMEOUT_S, self._cut)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cut(self) -> None:
        """Close the connection (a handler waiting for the body sees a disconnect)."""
        self._stop_deadline()
        if not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        others = [c for c in self.connections
                  if c is not self and isinstance(c, LimitedH11) and c.waiting()]  # fmt: skip
        victim = min(others, key=lambda c: c._opened, default=self)
        victim._cut()


def connection_budget() -> int:
    """Raise the soft descriptor limit to the hard one; how many connections fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # not allowed here: live with the soft limit
            pass
    return max(16, min(MAX_CONNECTIONS, soft - RESERVED_FDS))


def limited_protocol(max_connections: int) -> type[LimitedH11]:
    """The protocol class uvicorn builds each connection from, with this server's cap."""
    return type("LimitedH11", (LimitedH11,), {"max_connections": max_connections})
