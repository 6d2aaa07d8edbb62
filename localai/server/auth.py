"""Bearer-token auth, on by default.

The token is 32 random bytes (URL-safe base64) in `$LOCALAI_HOME/token`, created with mode 0600 on
first start, so only the user who runs the daemon (and their editors, configured with it) can
reach the model; other local users and web pages cannot. Every route but /health needs
`Authorization: Bearer <token>`. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
from pathlib import Path

from ..private import private_file
from .errors import APIError, render

PROOF_PATH = "/localai/proof"
OPEN_PATHS = frozenset({"/health", PROOF_PATH})


def token_path(home: Path) -> Path:
    return Path(home) / "token"


def ensure_token(home: Path) -> str:
    """Read the token, creating it (0600) if absent; tighten a file others could read."""
    path = token_path(home)
    if private_file(path):
        token = secrets.token_urlsafe(32)
        path.write_text(token + "\n")
        return token
    token = path.read_text().strip()
    if len(token) < 16:
        raise OSError(f"{path} holds no usable token; delete it and start again")
    return token


def read_token(home: Path) -> str | None:
    """The token if the file exists (for clients of the daemon), else None."""
    try:
        return token_path(home).read_text().strip() or None
    except OSError:
        return None


def proof(key: str, challenge: str, host: str, port: int) -> str:
    """What the daemon answers to a client's challenge: HMAC-SHA256 keyed with this home's
    token, over the challenge and the address the connection reached (the daemon's end of it,
    the client's peer). Only a process that can read the token can answer, and an answer
    relayed from a daemon on another address or port does not match the one asked."""
    msg = f"localai daemon proof\n{challenge}\n{host}\n{port}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    """True if `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback
                       for a in socket.getaddrinfo(host, None))  # fmt: skip
        except OSError:
            return False


class BearerAuth:
    """ASGI middleware: 401 unless the request carries the token (None disables the check)."""

    def __init__(self, app, token: str | None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        msg = "missing bearer token" if not given else "wrong bearer token"
        err = APIError(
            401,
            f"{msg}: send 'Authorization: Bearer <token>'; `localai serve --print-token` prints it",
            type="authentication_error",
            code="invalid_api_key",
        )
        await render(err, scope["path"])(scope, receive, send)
