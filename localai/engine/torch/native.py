"""The optional C++ kernels in native/, built with torch's cpp_extension on first use.

The build (g++ and ninja, ~1 minute on 2 cores) is cached by torch under its extensions
directory and redone only when the source changes. Any failure (no compiler, no ninja, a
read-only cache) is remembered and reported once; callers then use the pure-torch reference.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[3] / "native" / "kv_attention.cpp"
log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error", set once


def load():
    """The built extension module, or None when it cannot be built here."""
    if "module" in _state:
        return _state["module"]
    if "error" in _state:
        return None
    with _lock:
        if not _state:
            try:
                from torch.utils.cpp_extension import load as build

                _ninja_on_path()

                _state["module"] = build(
                    name="localai_kv_attention",
                    sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-ffast-math"],
                    verbose=False,
                )
            except Exception as e:  # any build failure means: use the reference
                _state["error"] = f"{type(e).__name__}: {e}"
                log.warning("native KV attention unavailable, using torch: %s", _state["error"])
    return _state.get("module")


def _ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the pinned PyPI package puts it in the venv's bin, which
    is not on PATH when the venv's python is run without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # the build then fails, and callers use the torch reference


def status() -> str:
    """'built', 'failed: …' or 'not built yet'."""
    if "module" in _state:
        return "built"
    if "error" in _state:
        return f"failed: {str(_state['error'])[:200]}"
    return "not built yet"
