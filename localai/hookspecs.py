"""Plugin hook specifications (pluggy). Plugins are distributions with an entry point in the
`localai` group whose module defines functions marked `@localai.hookspecs.hookimpl`; localai's
own built-ins register through these same hooks. Every hook takes a `register` callable (or the
CLI group) so a plugin adds things without importing localai internals."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("localai")
hookimpl = pluggy.HookimplMarker("localai")


@hookspec
def localai_register_loaders(register):
    """Add document loaders: register(name, loader, suffixes=(...), filenames=(...))."""


@hookspec
def localai_register_tools(register):
    """Add tools the model may call: register(localai.tools.Tool(...))."""


@hookspec
def localai_register_commands(cli):
    """Add commands to the `localai` click group `cli`."""


@hookspec
def localai_register_models(register):
    """Add model sources: register(localai.catalog.ModelSpec(...)) for `localai models`."""
