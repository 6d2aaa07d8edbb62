"""No file in a source can stall or crash indexing, searching or the watcher: files that change
kind after they were indexed, names that are not UTF-8, trees deeper than Python's recursion
limit, escape sequences in names. Real files, a real sqlite index, the real MiniLM model."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import localai
from test_index import TOPICS, section

from localai.config import load_settings
from localai.index import IndexError_
from localai.index.facade import Index
from localai.index.paths import user_path
from localai.index.walk import BAD_NAME, MAX_FILE_BYTES, Found, NotIndexable, read_indexable, walk


def wide() -> dict:
    return dict(os.environ, COLUMNS="1000")  # rich wraps long names at 80 columns otherwise


FIFO = "not a regular file: a FIFO (named pipe)"
DEVICE = "not a regular file: a character device"
TOO_BIG = f"larger than the {MAX_FILE_BYTES >> 20} MB limit"


@pytest.fixture
def index(home, embedder):
    ix = Index.open(load_settings(), embedder=embedder)
    yield ix
    ix.close()


def write_topics(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.md").write_text(section(name.title(), TOPICS[name]))
    return folder


def bounded(fn, *args, seconds: float = 60):
    """fn(*args) on a thread; fails (instead of hanging the suite) if it does not return."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001  (raised again on the test's thread)
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def become_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def become_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def become_too_big(path: Path) -> None:
    with open(path, "ab") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no 10 MB written to the disk


def test_read_indexable_refuses_what_the_walk_skips(tmp_path):
    fifo, big, ok = tmp_path / "pipe", tmp_path / "big.txt", tmp_path / "ok.txt"
    os.mkfifo(fifo)  # no writer: a plain open() would wait forever
    big.write_bytes(b"x" * 2048)
    ok.write_text("fine")
    for path, why, limit in ((fifo, FIFO, 1024), (Path("/dev/zero"), DEVICE, 1024),
                             (big, "larger than the 0 MB limit", 1024),
                             (tmp_path / "gone", "the file is gone", 1024)):  # fmt: skip
        with pytest.raises(NotIndexable, match=re.escape(why)):
            bounded(read_indexable, path, limit)
    assert read_indexable(ok) == b"fine"
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "pipe")
    items = list(walk(tmp_path / "d"))
    assert [(i.path.name, i.reason) for i in items] == [("pipe", FIFO)]  # said, not silent


@pytest.mark.parametrize("change, reason", [(become_fifo, FIFO), (become_dev_zero, DEVICE),
                                            (become_too_big, TOO_BIG)])  # fmt: skip
def test_a_file_that_stops_being_indexable_is_never_read_and_is_dropped(index, tmp_path, change,
                                                                        reason):  # fmt: skip
    docs = write_topics(tmp_path / "docs", "taxes", "cheese")
    index.add_source(docs)
    index.update()
    hit = index.search("income tax return deadline", k=1, mode="bm25")[0]
    assert hit.path.endswith("taxes.md")
    change(docs / "taxes.md")
    passage = bounded(index.read, hit)  # read back before the next walk: refused, not read
    assert not passage.verified and passage.text == ""
    assert passage.reason == f"the file cannot be read back: {reason}"
    st = index.update()
    assert {"path": str(docs / "taxes.md"), "reason": reason} in st.skipped
    assert st.removed == 1 and st.files == 1
    assert not any(h.path.endswith("taxes.md") for h in index.search("income tax", k=5))
    assert index.check() == []
    assert index.update().removed == 0  # skipped again, with its reason; nothing left to drop


@contextmanager
def watching(index):
    stop = threading.Event()
    errors: list = []
    t = threading.Thread(target=index.watch, args=(stop,),
                         kwargs={"on_error": lambda e, _s: errors.append(e)})  # fmt: skip
    t.start()
    time.sleep(0.5)  # let the observer start
    try:
        yield errors
    finally:
        stop.set()
        t.join(timeout=30)


def wait_for(predicate, seconds: float = 60) -> bool:
    """Poll until `predicate()`; generous for a loaded machine, not a speed assert."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_the_watcher_drops_a_file_that_became_a_fifo(index, tmp_path):
    docs = write_topics(tmp_path / "docs", "taxes", "cheese")
    index.add_source(docs)
    index.update()
    with watching(index) as errors:
        become_fifo(docs / "taxes.md")
        assert wait_for(lambda: not index.search("income tax return", k=5, mode="bm25")), errors
        assert errors == []
    assert index.check() == [] and index.stats()["files"] == 1


def bad_name(folder: Path) -> Path:
    raw = os.path.join(os.fsencode(folder), b"bad\xff.txt")
    with open(raw, "wb") as f:
        f.write(b"Cheddar from a file whose name is Latin-1.\n")
    return Path(os.fsdecode(raw))


def test_a_name_that_is_not_utf8_is_skipped_with_a_reason(home, tmp_path):
    docs = write_topics(tmp_path / "docs", "cheese")
    bad = bad_name(docs)
    r = localai("index", str(docs), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    st = json.loads(r.stdout)
    assert st["files"] == 1
    assert {"path": os.fsdecode(bad), "reason": BAD_NAME} in st["skipped"]
    shown = localai("index", env=wide())  # the summary prints the name, escaped
    assert shown.returncode == 0 and "bad\\udcff.txt" in shown.stderr, shown.stderr
    r = localai("index", str(bad))
    assert r.returncode == 1 and "not valid UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_the_watcher_goes_on_past_a_name_that_is_not_utf8(index, tmp_path):
    one, two = write_topics(tmp_path / "one", "cheese"), write_topics(tmp_path / "two", "bikes")
    index.add_source(one)
    index.add_source(two)
    index.update()
    with watching(index) as errors:
        bad_name(one)
        time.sleep(1)  # the bad name first, then a saved file in another source
        (two / "violin.md").write_text(section("Violin", TOPICS["violin"]))
        assert wait_for(lambda: index.search("rosin the violin bow", k=1, mode="bm25")), errors
        assert errors == []


@pytest.fixture
def deep(tmp_path):
    """A folder 1,000 levels deep, removed bottom up afterwards (shutil.rmtree, and so pytest's
    cleanup of old temporary folders, would recurse past the limit)."""
    root = tmp_path / "deep"
    levels = [root]
    for _ in range(1000):  # pathlib's mkdir(parents=True) recurses too
        levels.append(levels[-1] / "d")
        levels[-1].mkdir(parents=True)
    yield root, levels[-1]
    for folder in reversed(levels):
        for f in folder.iterdir():
            if not f.is_dir():
                f.unlink()
        folder.rmdir()


def test_a_tree_deeper_than_the_recursion_limit_is_indexed_and_not_a_stall(index, tmp_path,
                                                                              deep):  # fmt: skip
    """The walk keeps its own stack; watchdog's recursive watch cannot follow such a tree, which
    is said once, and the other sources are watched all the same."""
    root, bottom = deep
    (bottom / "cheese.md").write_text(section("Cheese", TOPICS["cheese"]))
    assert [i.path for i in walk(root) if isinstance(i, Found)] == [bottom / "cheese.md"]
    other = write_topics(tmp_path / "other", "bikes")
    index.add_source(root)
    index.add_source(other)
    assert index.update().files == 2
    with watching(index) as errors:
        # the deep source's watch fails first, then the other's starts: on a loaded machine that
        # takes longer than the half second `watching` waits, and a write before it is missed
        assert wait_for(lambda: errors)
        time.sleep(1)
        (other / "violin.md").write_text(section("Violin", TOPICS["violin"]))
        assert wait_for(lambda: index.search("rosin the violin bow", k=1, mode="bm25")), errors
        assert [str(e) for e in errors] == [
            f"cannot follow changes under {root} (the folder "
            "tree is too deep); `localai index` still indexes it"
        ]
    (bottom / "stars.md").write_text(section("Stars", TOPICS["stars"]))
    assert index.update().files == 4


def test_sources_are_normalised_and_paths_checked(index, tmp_path):
    docs = write_topics(tmp_path / "c", "cheese")
    added = index.add_source(str(docs) + "/../c/./")
    assert added == docs
    index.update()
    assert [(s["path"], s["files"]) for s in index.sources()] == [(str(docs), 1)]
    for bad in ("~no-such-user-here/notes", "~\x00x"):
        with pytest.raises(IndexError_):
            index.add_source(bad)
    assert user_path("~/x") == Path.home() / "x"
    assert index.remove_source(str(docs) + "/") == 1


def test_the_index_and_its_home_are_private(home, tmp_path):
    docs = write_topics(tmp_path / "docs", "cheese")
    r = localai("index", str(docs))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for f in home.glob("index.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_an_older_index_others_could_read_is_tightened(home, embedder):
    home.mkdir(mode=0o755)
    Index.open(load_settings(), embedder=embedder).close()
    db = home / "index.db"
    os.chmod(db, 0o644)
    Index.open(load_settings(), embedder=embedder).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_escape_sequences_in_names_reach_no_terminal(home, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    evil = docs / "a\x1b]0;owned\x07\x1b[2J.md"
    evil.write_text(section("Cheese", TOPICS["cheese"]))
    assert localai("index", str(docs)).returncode == 0
    r = localai("search", "aged cheddar cheese", "--no-daemon", "-k", "1", env=wide())
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "a\\x1b]0;owned\\x07\\x1b[2J.md" in r.stdout
    out = json.loads(localai("search", "aged cheddar", "--no-daemon", "--json").stdout)
    assert out[0]["path"] == str(evil)  # scripts get the real name
