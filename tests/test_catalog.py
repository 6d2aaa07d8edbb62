import dataclasses
import re

import pytest
from conftest import TEST_MODEL

from localai.catalog import Catalog, CatalogError, load_catalog, resolve_model, sha256_file
from localai.rag.prompt import DEFAULT_LAYOUT
from localai.runtime import check_rag_layout, model_specs


def test_catalog_entries_are_complete():
    specs = load_catalog()
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "minilm-l6-int8"} <= set(
        specs
    )
    for s in specs.values():
        assert s.kind in ("chat", "embed") and s.license and s.context_length > 0
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", p) for p in s.packages), s.packages
        for f in s.files:
            assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and f.size > 0 and f.parts


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.slow
def test_pull_verify_detect_corruption_and_repull(tmp_path):
    cat = Catalog(tmp_path / "models")
    spec = cat.spec(TEST_MODEL)
    assert not cat.is_installed(TEST_MODEL)
    with pytest.raises(CatalogError, match="not installed"):
        cat.locate(TEST_MODEL)

    path = cat.pull(TEST_MODEL)
    assert sha256_file(path) == spec.files[0].sha256
    assert cat.problems(TEST_MODEL, full=True) == []
    assert [p.name for p in cat.dir.iterdir()] == [TEST_MODEL]  # no scratch left behind

    flip_byte(path, spec.size // 2)  # same size, new mtime: must be re-hashed, not trusted
    assert "sha256" in " ".join(cat.problems(TEST_MODEL))
    with pytest.raises(CatalogError, match="models pull"):
        cat.locate(TEST_MODEL)

    logs = []
    cat.ensure(TEST_MODEL, log=logs.append)
    assert any("damaged" in m for m in logs)
    assert cat.problems(TEST_MODEL, full=True) == []

    with open(path, "r+b") as f:  # a partial file
        f.truncate(spec.size // 3)
    assert "bytes, expected" in " ".join(cat.problems(TEST_MODEL))
    assert cat.rm(TEST_MODEL) and not cat.is_installed(TEST_MODEL)


@pytest.mark.slow
def test_package_that_does_not_match_the_catalog_is_refused(tmp_path):
    spec = load_catalog()[TEST_MODEL]
    bad = dataclasses.replace(spec, files=(dataclasses.replace(spec.files[0], sha256="0" * 64),))
    cat = Catalog(tmp_path / "models", {TEST_MODEL: bad})
    with pytest.raises(CatalogError, match="does not match"):
        cat.pull(TEST_MODEL)
    assert not cat.is_installed(TEST_MODEL)
    assert list(cat.dir.iterdir()) == []


def test_interrupted_pull_is_not_installed(tmp_path):
    cat = Catalog(tmp_path / "models")
    scratch = cat.dir / f".pull-{TEST_MODEL}-999" / "out"
    scratch.mkdir(parents=True)
    (scratch / cat.spec(TEST_MODEL).main_file).write_bytes(b"GGUF partial")
    assert not cat.is_installed(TEST_MODEL)
    assert cat.rows()[0]["installed"] is False


def test_local_gguf_path_and_bad_names(tmp_path, model_path):
    cat = Catalog(tmp_path / "models")
    assert resolve_model(cat, str(model_path)) == model_path
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello")
    with pytest.raises(CatalogError, match="not a GGUF"):
        resolve_model(cat, str(fake))
    with pytest.raises(CatalogError, match="no such model file"):
        resolve_model(cat, str(tmp_path / "missing.gguf"))
    with pytest.raises(CatalogError, match="unknown model 'nope'"):
        resolve_model(cat, "nope")


def test_rag_layout_per_model():
    specs = load_catalog()
    assert specs["qwen2.5-coder-1.5b"].rag_layout == "oneshot"
    assert specs["qwen2.5-coder-0.5b"].rag_layout == "oneshot"
    assert specs["smollm2-135m"].rag_layout == "system"  # it copies the one-shot example


def entry(name: str, extra: str = "") -> str:
    return f"""
[models."{name}"]
kind = "chat"
description = "d"
arch = "llama"
context_length = 2048
license = "MIT"
packages = ["x==1.0"]
{extra}
[[models."{name}".files]]
name = "m.gguf"
sha256 = "{"0" * 64}"
size = 1
parts = ["x/m.gguf"]
"""


def test_rag_layout_defaults_to_system_and_unknown_names_are_refused(tmp_path):
    """The catalog keeps the name; RAG's layouts decide, when the models are listed (runtime),
    so a typo fails at start, not at the first question."""
    toml = tmp_path / "catalog.toml"
    toml.write_text(entry("plain"))
    assert model_specs(toml)["plain"].rag_layout == "system" == DEFAULT_LAYOUT.name
    toml.write_text(entry("plain") + entry("typo", 'rag_layout = "one-shot"'))
    assert load_catalog(toml)["typo"].rag_layout == "one-shot"  # the catalog does not judge it
    with pytest.raises(CatalogError, match=r"model typo: unknown rag_layout 'one-shot'; "
                       r"choose one of: system, oneshot"):  # fmt: skip
        model_specs(toml)
    # a plugin's spec is checked the same way when it registers it
    with pytest.raises(CatalogError, match="choose one of"):
        check_rag_layout(dataclasses.replace(load_catalog()[TEST_MODEL], rag_layout="sideways"))
