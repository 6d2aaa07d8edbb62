"""Shared fixtures: the real SmolLM2-135M test model, installed once into a cache directory that
is reused across runs (LOCALAI_TEST_MODELS, default ~/.cache/localai-test/models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localai.catalog import Catalog

TEST_MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[1]


def _models_dir() -> Path:
    default = Path.home() / ".cache" / "localai-test" / "models"
    return Path(os.environ.get("LOCALAI_TEST_MODELS", default))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = _models_dir()
    Catalog(d).ensure(TEST_MODEL, log=lambda m: print(m, file=sys.stderr))
    return d


@pytest.fixture(scope="session")
def model_path(models_dir) -> Path:
    return Catalog(models_dir).locate(TEST_MODEL)


@pytest.fixture(scope="session")
def engine(model_path):
    from localai.engine.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(model_path, TEST_MODEL, context_length=2048, threads=2)
    yield eng
    eng.close()


@pytest.fixture
def home(tmp_path, models_dir, monkeypatch) -> Path:
    """An empty LOCALAI_HOME that shares the installed test models."""
    h = tmp_path / "home"
    monkeypatch.setenv("LOCALAI_HOME", str(h))
    monkeypatch.setenv("LOCALAI_MODELS", str(models_dir))
    for var in ("LOCALAI_MODEL", "LOCALAI_ENGINE", "LOCALAI_CONTEXT_LENGTH"):
        monkeypatch.delenv(var, raising=False)
    return h


def localai(*args: str, input: str | None = None, timeout: float = 300, env=None):
    """Run the real `localai` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "localai", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


EMBED_MODEL = "minilm-l6-int8"


def docs_index(root: Path, models_dir: Path, embedder, docs: dict[str, str]):
    """An index under `root` over files written from `docs` (name -> text), caught up."""
    from localai.config import load_settings
    from localai.index.facade import Index

    folder = root / "docs"
    folder.mkdir()
    for name, text in docs.items():
        (folder / name).write_text(text)
    ix = Index.open(load_settings(root / "home", models_dir=models_dir), embedder=embedder)
    ix.add_source(folder)
    ix.update()
    return ix


@pytest.fixture(scope="session")
def embedder(models_dir):
    from localai.index.embedder import Embedder

    cat = Catalog(models_dir)
    cat.ensure(EMBED_MODEL, log=lambda m: print(m, file=sys.stderr))
    return Embedder(cat.file(EMBED_MODEL, "model.onnx"), cat.file(EMBED_MODEL, "tokenizer.json"))


@pytest.fixture(scope="session")
def daemon(models_dir, tmp_path_factory):
    """One real `localai serve` (SmolLM2, ctx 1024, a small indexed folder) on a free loopback
    port for the session."""
    from daemon_helpers import start_daemon, write_docs

    Catalog(models_dir).ensure(EMBED_MODEL, log=lambda m: print(m, file=sys.stderr))
    root = tmp_path_factory.mktemp("daemon")
    docs = write_docs(root / "docs")
    # kept loaded for the session: tests of idle unloads start their own (test_server_memory)
    with start_daemon(root / "home", models_dir, TEST_MODEL, "--keep-alive=-1", docs=docs) as d:
        yield d
