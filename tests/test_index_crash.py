"""kill -9 a real `localai index` subprocess at several points; the index stays consistent and
the next run resumes (files committed before the kill are not redone)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from localai.config import load_settings
from localai.index import store
from localai.index.facade import db_path
from localai.index.vectors import DEFAULT_CODEC, codec

_NATO = """alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november
oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"""
WORDS = _NATO.split()


def write_files(root, n, salt=""):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        paras = []
        for p in range(4):
            words = [WORDS[(i * 7 + p * 3 + j) % len(WORDS)] for j in range(70)]
            paras.append(f"Note {i}{salt} part {p}: " + " ".join(words) + ".")
        (root / f"note{i:03d}.md").write_text(f"# Note {i}\n\n" + "\n\n".join(paras) + "\n")


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "localai", *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def committed(db) -> int:
    return db.execute("SELECT count(*) FROM files").fetchone()[0]


def run_and_kill(env, root, db_file, after_files: int | None, wait_s: float = 0.0, until=None):
    """Start `localai index ROOT`; SIGKILL it once `after_files` files are committed (None:
    after `wait_s` seconds; or once `until(db)` holds); return True if it was killed before it
    finished."""
    proc = subprocess.Popen([sys.executable, "-m", "localai", "index", str(root), "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.02)
            if after_files is None:
                if time.monotonic() - t0 >= wait_s:
                    break
            elif db_file.exists():
                db = store.connect(db_file)
                done = until(db) if until else committed(db) >= after_files
                db.conn.close()
                if done:
                    break
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        return False
    finally:
        proc.stdout.close()
        proc.stderr.close()


def assert_consistent(db_file):
    db = store.connect(db_file)
    try:
        assert store.problems(db, codec(store.get_meta(db, "codec", DEFAULT_CODEC)).nbytes) == []
        dup = db.execute(
            "SELECT count(*) FROM "
            "(SELECT file_id, ord FROM chunks GROUP BY 1, 2 HAVING count(*) > 1)"
        ).fetchone()[0]
        assert dup == 0
        return committed(db)
    finally:
        db.conn.close()


@pytest.mark.slow
def test_kill_9_during_indexing_then_resume(home, tmp_path):
    env = dict(os.environ)
    root = tmp_path / "notes"
    write_files(root, 40)
    db_file = db_path(load_settings())
    killed_at = []
    # 1: while the model loads / the first batch embeds (nothing committed yet)
    assert run_and_kill(env, root, db_file, None, wait_s=1.5)
    killed_at.append(assert_consistent(db_file) if db_file.exists() else 0)
    # 2..3: right after a batch of files starts committing, and again further on
    for target in (1, 20):
        run_and_kill(env, root, db_file, max(target, killed_at[-1] + 1))
        killed_at.append(assert_consistent(db_file))
    r = cli(env, "index", str(root), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["unchanged"] >= killed_at[-1]  # resumed: committed files were not redone
    assert st["files"] == 40 and assert_consistent(db_file) == 40
    # a second wave: changes and deletions, killed half-way, then finished
    write_files(root, 12, salt="b")
    for i in range(32, 40):
        (root / f"note{i:03d}.md").unlink()
    # killed once deletions have begun (changed files are written first, deletions last)
    run_and_kill(env, root, db_file, 0, until=lambda db: committed(db) < 40)
    assert_consistent(db_file)
    r = cli(env, "index", str(root), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["files"] == 32 and assert_consistent(db_file) == 32
    r = cli(env, "index", "--check")
    assert r.returncode == 0 and "consistent" in r.stderr
    r = cli(env, "search", "Note 3b part 2", "--json", "-k", "1")
    assert json.loads(r.stdout)[0]["verified"] is True
