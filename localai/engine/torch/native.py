"""The optional C++ kernels in native/ (runner.h lists them), built with torch's cpp_extension
into one module on first use: products with GGUF-block matrices as they are in the file, on
ggml's own CPU kernels (bound at run time from the libggml-cpu.so that llama-cpp-python
installs); fused decode attention over the quantized KV pages; a fused decode step per
half-block.

The build (g++ and ninja, 1-2 minutes on 2 cores) is cached under torch's extensions directory,
in a folder named by a hash of the sources and flags (`build_dir`), so it is redone only when
one of them changes and two checkouts never rebuild over each other. Any failure (no compiler,
no ninja, a read-only cache, no ggml library) is remembered and reported once; callers then use
the pure-torch reference.

Instruction set: our own C++ is compiled for AVX2 + FMA + F16C on x86-64 CPUs that have them,
never for AVX-512 or AMX, so it runs the same code on a laptop and on a server; the quantized
products' SIMD code is ggml's, which its build dispatches for the CPU (bench/torch_runner.py
measures a ggml built with AVX2 only beside the native one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[3] / "native"
FILES = ["module.cpp", "pool.cpp", "qmatmul.cpp", "kv_pages.cpp", "kv_attention.cpp", "decode.cpp"]
log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error", set once


def load():
    """The built extension module, or None when it cannot be built here."""
    state = _state
    if "module" in state:
        return state["module"]
    if "error" in state:
        return None
    with _lock:
        if not state:
            try:
                state["module"] = _build()
            except Exception as e:  # any build failure means: use the reference
                state["error"] = f"{type(e).__name__}: {e}"
                log.warning("native kernels unavailable, using torch: %s", state["error"])
    return state.get("module")


def _build():
    from torch.utils.cpp_extension import load as build

    _ninja_on_path()
    sources, flags = [SOURCES / f for f in FILES], build_flags()
    with build_dir(sources, flags) as where:
        module = build(name="localai_runner", sources=[str(f) for f in sources],
                       extra_cflags=flags, build_directory=str(where), verbose=False)  # fmt: skip
    lib = ggml_lib_dir()
    module.ggml_bind(str(lib / "libggml-cpu.so"), str(lib / "libggml-base.so"))
    return module


def build_flags() -> list[str]:
    return ["-O3", "-ffast-math", *isa_flags()]


@contextlib.contextmanager
def build_dir(sources: list[Path], flags: list[str]):
    """The build's own folder, named by a hash of its sources, their folder, flags and torch
    version (two checkouts, or two versions, never rebuild over each other: ninja rebuilds
    whenever the sources' paths change, even to identical files), held under an flock while
    torch builds or loads there. torch's own build lock is a file that a killed build leaves
    behind, after which every later load waits forever; the flock dies with its process, so
    under it a leftover lock file is known stale and removed."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256(" ".join([torch.__version__, *flags]).encode())
    digest.update(str(sources[0].resolve().parent).encode())
    for f in sources:
        digest.update(f.read_bytes())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    where = root / f"localai_runner-{digest.hexdigest()[:16]}"
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released by the kernel if this process dies
        (where / "lock").unlink(missing_ok=True)
        yield where


def ggml_lib_dir() -> Path:
    """Where llama-cpp-python keeps ggml's shared libraries (no import of llama_cpp needed)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llama-cpp-python is not installed")
    return Path(spec.submodule_search_locations[0]) / "lib"


def isa_flags() -> list[str]:
    """AVX2 + FMA + F16C where the CPU has them (x86-64), the CPU's own ISA elsewhere."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["-march=native"]
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()  # fmt: skip
    except (OSError, StopIteration):
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


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
    state = _state
    if "module" in state:
        return "built"
    if "error" in state:
        return f"failed: {str(state['error'])[:200]}"
    return "not built yet"
