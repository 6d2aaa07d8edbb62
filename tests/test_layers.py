"""The layers of localai, checked from the imports: dependencies point one way.

    commands    cli, __main__
    processes   daemon, daemon_client, repl, builtin_plugins
    http        server
    wiring      runtime, catalog
    rag         rag
    parts       index | engine        (independent: neither imports the other)
    base        config, governor, private, terminal, tools, hookspecs, plugins, localai/__init__

A module may import its own layer and the layers below it, never one above, and the index and
the engine never import each other. Every import counts: at module level, inside a function
(lazy), and under `if TYPE_CHECKING:` (a type is a dependency too). Every module under localai/
must belong to a layer, so a new one has to be placed.

One dependency is not visible as an import and is by design: the plugin manager (base) loads
localai.builtin_plugins and installed plugins by name, and the index's loader registry calls
them. A plugin sits above what it registers into.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "localai"

LAYERS = [  # lowest first
    ("base", ["localai", "localai.config", "localai.governor", "localai.private",
              "localai.terminal", "localai.tools", "localai.hookspecs", "localai.plugins",
              "localai.durations", "localai.pressure"]),
    ("parts", ["localai.index", "localai.engine"]),
    ("rag", ["localai.rag"]),
    ("wiring", ["localai.runtime", "localai.catalog", "localai.keepalive"]),
    ("http", ["localai.server"]),
    ("processes", ["localai.daemon", "localai.daemon_client", "localai.repl",
                   "localai.builtin_plugins"]),
    ("commands", ["localai.cli", "localai.__main__"]),
]  # fmt: skip
INDEPENDENT = [("localai.index", "localai.engine")]
LEVEL = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}
NAME = {part: name for name, parts in LAYERS for part in parts}


def part_of(module: str) -> str | None:
    """The layer entry holding `module`: the longest listed name it is or is inside of (the
    package `localai` itself holds only localai/__init__.py)."""
    if module == "localai":
        return "localai"
    inside = [p for p in LEVEL if p != "localai" and (module == p or module.startswith(p + "."))]
    return max(inside, key=len, default=None)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every localai module `path` imports, relative imports resolved; for
    `from X import name` the target is X.name when that is a module, else X."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    root / Path(*sub.split(".")) / "__init__.py"
                ).is_file()
                found.append((node.lineno, sub if is_module else target))
    return [(line, m) for line, m in found if m == "localai" or m.startswith("localai.")]


def violations(root: Path) -> list[str]:
    """Every import that breaks the layers, and every module outside them."""
    out = []
    for path in sorted((root / "localai").rglob("*.py")):
        mod = module_name(path, root)
        here = part_of(mod)
        if here is None:
            out.append(f"{mod}: in no layer; add it to LAYERS in {Path(__file__).name}")
            continue
        for line, target in imports(path, root):
            there = part_of(target)
            if there is None or there == here:
                continue
            where = f"{path.relative_to(root)}:{line}: {mod} imports {target}"
            if LEVEL[there] > LEVEL[here]:
                out.append(f"{where}, a layer above it ({NAME[here]} < {NAME[there]})")
            elif {here, there} in [set(pair) for pair in INDEPENDENT]:
                out.append(f"{where}, but {here} and {there} are independent")
    return out


def test_dependencies_point_one_way():
    assert violations(ROOT) == []


def test_the_check_finds_a_loop_and_a_stray_module(tmp_path):
    """The check itself, on a copy of the package with an upward import put back (the loop the
    index had: the index imports the catalog, which imports RAG, which imports the index), a
    sibling import and a module in no layer."""
    shutil.copytree(PACKAGE, tmp_path / "localai")
    search = tmp_path / "localai" / "index" / "search.py"
    search.write_text(search.read_text() + "\nfrom ..catalog import Catalog  # noqa\n")
    bm25 = tmp_path / "localai" / "index" / "bm25.py"
    bm25.write_text(bm25.read_text() + "\n\ndef f():\n    from ..engine import chat\n")
    (tmp_path / "localai" / "stray.py").write_text("")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert any("localai.index.search imports localai.catalog, a layer above" in v for v in found)
    assert any("localai.index.bm25 imports localai.engine, but" in v for v in found)
    assert any(v.startswith("localai.stray: in no layer") for v in found)


def test_every_listed_part_exists():
    for part in LEVEL:
        path = ROOT / Path(*part.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), part


INDEX_RUN = """
import importlib, json, pkgutil, sys
from pathlib import Path

import localai.index
from localai.config import load_settings
from localai.index.embedder import Embedder
from localai.index.facade import Index

for m in pkgutil.walk_packages(localai.index.__path__, "localai.index."):
    importlib.import_module(m.name)
model, tokenizer, home, docs = sys.argv[1:]
index = Index.open(load_settings(home), embedder=Embedder(Path(model), Path(tokenizer)))
index.add_source(docs)
index.update()
hits = index.search("lighthouse keeper", k=3)
assert hits and index.read_many(hits)[0].verified, hits
index.close()
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] == "localai")))
"""


def test_the_index_runs_without_rag_or_the_engine(tmp_path, embedder):
    """In a fresh process, importing every module of the index and indexing, searching and
    reading back real files loads nothing of RAG, the engine or the layers above them."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("# Lighthouse\n\nThe keeper lit the lamp.\n")
    (tmp_path / "docs" / "page.html").write_text("<p>The lighthouse keeper's log.</p>")
    bare = subprocess.run([sys.executable, "-c", "import localai.index, sys; "
                           "print([m for m in sys.modules if m.startswith('localai.')])"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert bare.stdout.strip() == "['localai.index']"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALAI_")}
    run = subprocess.run(
        [sys.executable, "-c", INDEX_RUN, str(embedder.model_path),
         str(embedder.tokenizer_path), str(tmp_path / "home"), str(tmp_path / "docs")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert "localai.index.facade" in loaded and "localai.index.htmltext" in loaded
    above = [m for m in loaded if LEVEL[part_of(m)] > LEVEL["localai.index"]]
    # the plugin manager loads the built-in plugins (as it loads installed ones) to find loaders
    assert above == ["localai.builtin_plugins"], above
    assert not [m for m in loaded if part_of(m) == "localai.engine"]
