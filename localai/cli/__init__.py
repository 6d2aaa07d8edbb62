"""The `localai` command: `main` is the click group; importing a module registers its commands."""

from . import generate, index, models  # noqa: F401  (registers commands)
from .app import main

__all__ = ["main"]
