"""Bearer-token auth, on by default.

The token is 32 random bytes (URL-safe base64) in `$LOCALAI_HOME/token`, created with mode 0600 on
first start, so only the user who runs the daemon (and their editors, configured with it) can
reach the model; other local users and web pages cannot. Every route but /health needs
`Authorization: Bearer <token>`. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import stat
from pathlib import Path

from .errors import APIError, render

OPEN_PATHS = frozenset({"/health"})


def token_path(home: Path) -> Path:
    return Path(home) / "token"


def ensure_token(home: Path) -> str:
    """Read the token, creating it (0600) if absent; tighten a file others could read."""
    path = token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, 0o600)  # a token others can read is no secret
        token = path.read_text().strip()
        if len(token) < 16:
            raise OSError(f"{path} holds no usable token; delete it and start again") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token(home: Path) -> str | None:
    """The token if the file exists (for clients of the daemon), else None."""
    try:
        return token_path(home).read_text().strip() or None
    except OSError:
        return None


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
