"""Requests from web pages are refused: a Host check (DNS rebinding), an Origin check (cross-site
requests) and JSON bodies only as `application/json` (forms and `text/plain` POSTs), before auth.

A page the user visits can make the browser send requests to 127.0.0.1: a form or a fetch()
POST whose body is `text/plain` or has no type needs no CORS preflight, and after DNS rebinding
the page's own host name points at 127.0.0.1, so even reading answers is same-origin to the
browser. Bearer auth stops both only while it is on, and /health is always open. So, for every
route, auth on or off:
- `Host` must name this server: localhost, 127.0.0.1 or [::1], or the address it is bound to (a
  rebinding page's requests carry the attacker's host name). Its port is not checked: a browser
  names the port the page's URL reached, ours, and a tunnel (ssh -L 9000:localhost:8765) may
  name another. Served on every address (0.0.0.0, ::), an IP literal or this machine's host name
  is accepted too, so other machines can reach it by address; no rebinding page can send either
  as its own host name.
- A request with an `Origin` (browsers send it on every POST and cross-origin fetch) must come
  from this server itself, port included (a page on another local port is another site), and
  `Sec-Fetch-Site` must not be cross-site or same-site.
- A body must be `Content-Type: application/json`, which a page can send to another origin only
  after a preflight, and this server answers none: it sends no CORS headers at all.
OpenAI and Ollama clients and editors send neither Origin nor Sec-Fetch-Site, and their JSON
as application/json, so they pass unchanged; `curl -d` needs `-H 'Content-Type:
application/json'` (its default is the form type a web page's form posts too).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from .errors import APIError, render

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HOST = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


class HostNames:
    """The Host values this server answers to, for a bind address and port."""

    def __init__(self, host: str, port: int):
        self.port = port
        self.wildcard = host in WILDCARDS
        self.names = {n.lower() for n in (*LOOPBACK_NAMES, host)}
        if self.wildcard:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def accepts(self, host: str, port_too: bool = False) -> bool:
        """Whether a `Host` names this server; `port_too`: an Origin's host:port, whose port
        must be this server's (no port: 80)."""
        if not _HOST.fullmatch(host):  # no user@, path or spaces for urlsplit to read past
            return False
        try:
            parts = urlsplit("//" + host)
            name, port = parts.hostname, parts.port or 80
        except ValueError:  # a port that is not a number, a bracket left open
            return False
        if not name or (port_too and port != self.port):
            return False
        return name in self.names or (self.wildcard and _is_ip(name))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def refusal(scope, names: HostNames) -> APIError | None:
    """Why a request is refused as one a web page could have sent, or None to let it in."""
    headers = dict(scope["headers"])
    host = headers.get(b"host", b"").decode("latin-1")
    if host and not names.accepts(host):  # no browser leaves Host out; HTTP/1.0 tools may
        return APIError(403, f"Host {host!r} is not this server; localai answers only to "
                        "localhost, 127.0.0.1, [::1] or the address it listens on",
                        code="forbidden_host")  # fmt: skip
    origin = headers.get(b"origin", b"").decode("latin-1")
    if b"origin" in headers and not _own_origin(origin, names):
        return APIError(403, f"requests from web pages ({origin!r}) are refused: localai "
                        "serves local clients only", code="forbidden_origin")  # fmt: skip
    if headers.get(b"sec-fetch-site", b"") in (b"cross-site", b"same-site"):
        return APIError(403, "requests from other web sites are refused", code="forbidden_origin")
    if scope["method"] in BODY_METHODS and _has_body(headers) and not _is_json(headers):
        kind = headers.get(b"content-type", b"none").decode("latin-1")
        return APIError(415, f"the body must be JSON sent as Content-Type: application/json, "
                        f"not {kind} (curl: add -H 'Content-Type: application/json'); forms "
                        "and text/plain are refused so that web pages cannot post here",
                        code="unsupported_media_type")  # fmt: skip
    return None


def _own_origin(origin: str, names: HostNames) -> bool:
    parts = urlsplit(origin)
    return parts.scheme == "http" and names.accepts(parts.netloc, port_too=True)


def _has_body(headers: dict) -> bool:
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"


def _is_json(headers: dict) -> bool:
    kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return kind == b"application/json"


class WebPageGuard:
    """ASGI middleware: 403 for a foreign Host or a web page's Origin, 415 for a body that is
    not application/json; every route, before auth."""

    def __init__(self, app, names: HostNames):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = refusal(scope, self.names)
            if err is not None:
                return await render(err, scope["path"])(scope, receive, send)
        return await self.app(scope, receive, send)
