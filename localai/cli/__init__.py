"""The `localai` command: `main` is the click group; importing a module registers its commands."""

from . import ask, db, fit, generate, index, models, moe, perplexity, ps, serve  # noqa: F401  (registers)
from . import plugins as _plugins  # noqa: I001  (plugin commands come after the built-ins)
from .app import main

_plugins.register_plugin_commands()

__all__ = ["main"]
