"""Durations as Ollama writes them (`keep_alive`, OLLAMA_KEEP_ALIVE): "5m", "30s", "1h30m",
"300ms", a number of seconds (300, "300", 2.5). A negative duration means "forever" and is
returned as None; 0 means "at once"."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: object) -> float | None:
    """Seconds (>= 0), or None for a negative duration (keep forever); ValueError if `value`
    is not a duration."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not a duration")
    return None if seconds < 0 else seconds


def _go_duration(text: str) -> float:
    """Go's time.ParseDuration syntax: an optional sign, then number+unit pairs."""
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    pos, total = 0, 0.0
    for m in _PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(
            f"{text!r} is not a duration; write e.g. 30s, 5m, 1h, a number of seconds, "
            "or -1 for forever"
        )
    return sign * total


def describe(seconds: float | None) -> str:
    """How a person reads a duration: "forever", "at once", "5m", "1h30m", "2.5s"."""
    if seconds is None:
        return "forever"
    if seconds == 0:
        return "at once"
    if seconds < 60:
        return f"{seconds:g}s"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((h, "h"), (m, "m"), (s, "s")) if n) or "0s"


def until(seconds_left: float | None) -> str:
    """A countdown as `ollama ps` words it: "Forever", "4 minutes from now", "Stopping..."."""
    if seconds_left is None:
        return "Forever"
    if seconds_left <= 0:
        return "Stopping..."
    if seconds_left < 90:
        return f"{seconds_left:.0f} seconds from now"
    if seconds_left < 5400:
        return f"{seconds_left / 60:.0f} minutes from now"
    return f"{seconds_left / 3600:.0f} hours from now"
