"""Plugin loading: entry points in the `localai` group, plus localai's own built-in plugins.

A plugin that fails to import, or whose hook raises, is recorded with its error and skipped;
it never stops the command or the daemon. `report()` is what `localai plugins` prints.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import traceback
from dataclasses import dataclass, field

import pluggy

from . import hookspecs

GROUP = "localai"
BUILTINS = {"builtin": "localai.builtin_plugins"}


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin" or "<distribution> <version>"
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Plugins:
    def __init__(self, entry_points: bool = True):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        for name, modname in BUILTINS.items():
            self._register(name, importlib.import_module(modname), "localai")
        if entry_points:
            self._load_entry_points()

    def _register(self, name: str, module, source: str) -> None:
        self.pm.register(module, name=name)
        hooks = [h.name for h in self.pm.get_hookcallers(module) or []]
        self.info[name] = PluginInfo(name, source, sorted(hooks))

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=GROUP):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown"
            if ep.name in self.info:
                continue
            try:
                self._register(ep.name, ep.load(), dist)
            except Exception as e:  # an uninstallable or broken plugin is reported, not fatal
                self.info[ep.name] = PluginInfo(ep.name, dist, errors=[_describe(e)])

    def call_each(self, hook: str, **kwargs) -> list:
        """Call every implementation of `hook` separately, so one broken plugin cannot stop the
        others; failures are recorded on the plugin's info."""
        results = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                results.append(impl.function(**kwargs))
            except Exception as e:
                self.info[impl.plugin_name].errors.append(f"{hook}: {_describe(e)}")
        return results

    def report(self) -> list[dict]:
        return [
            {"name": i.name, "source": i.source, "hooks": i.hooks, "errors": i.errors}
            for i in self.info.values()
        ]


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" ({where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {e}{at}"


_lock = threading.Lock()
_plugins: Plugins | None = None


def get() -> Plugins:
    """The process-wide plugin set, loaded on first use."""
    global _plugins
    with _lock:
        if _plugins is None:
            _plugins = Plugins()
        return _plugins


def tools() -> dict:
    """Every registered tool by name (built-in and plugins)."""
    found: dict = {}
    get().call_each("localai_register_tools", register=lambda t: found.setdefault(t.name, t))
    return found
