"""The index on a real mixed corpus: Debian's python3-doc (about 1,000 HTML and text files).

Installs python3-doc with apt if it is missing (as root), copies the HTML tree into a scratch
folder (so the watcher has something it may write to) with a `.localaiignore` that leaves out
`_sources/` (the reST sources of the same pages), then measures with the real command:
- first index (`localai index DIR --json` in a fresh home): seconds, chunks/s, MB/s of text;
- storage: index_bytes / text_bytes, split into vector codes, FTS5 and the rest (payload bytes);
- a no-op re-index, as a share of the first index time;
- ordinary questions (a small hand-made set: question → the page that answers it): hit@10 and
  MRR at file level, hybrid vs bm25 vs vector, and query latency p50/p99;
- save-to-searchable: `localai index --watch` running, a new file written, time until a search
  finds it (5 trials).
Prints one JSON object.

    python bench/index_pydoc.py [--work /tmp/localai-bench/pydoc]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localai.config import load_settings  # noqa: E402
from localai.index.facade import Index  # noqa: E402
from localai.runtime import open_index  # noqa: E402

DOC = Path("/usr/share/doc/python3-doc/html")
QUESTIONS = [
    ("how do I sort a list of dictionaries by a key", "howto/sorting"),
    ("read a text file line by line", "tutorial/inputoutput"),
    ("create a virtual environment", "venv"),
    ("parse command line arguments and options", "argparse"),
    ("run a shell command and capture its output", "library/subprocess"),
    ("serialize a Python object to JSON", "library/json"),
    ("regular expression to match at the start of a string", "re"),
    ("what is new in Python 3.11 exception groups", "whatsnew/3.11"),
    ("how do I make an HTTP request to a URL", "urllib"),
    ("dataclass with default values for fields", "library/dataclasses"),
    ("measure execution time of small code snippets", "library/timeit"),
    ("work with dates and time zones", "library/datetime"),
    ("run coroutines concurrently with asyncio", "asyncio"),
    ("count occurrences of items in a list", "collections"),
    ("copy a directory tree recursively", "library/shutil"),
    ("write log messages to a file", "logging"),
]


def ensure_docs() -> None:
    if DOC.is_dir():
        return
    if os.geteuid() != 0:
        sys.exit("python3-doc is not installed; run: sudo apt-get install -y python3-doc")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "python3-doc"], check=True)


def cli(env, *args, timeout=3600):
    r = subprocess.run([sys.executable, "-m", "localai", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    if r.returncode != 0:
        sys.exit(r.stderr)
    return r


def components(ix: Index) -> dict:
    db = ix.db
    vec = db.execute("SELECT coalesce(sum(length(code)), 0) FROM chunks").fetchone()[0]
    out = {"vectors": vec}
    for t in [t for t in ("fts", "fts_tf") if t in db.table_names()]:  # payload of each table
        n = db.execute(f"SELECT coalesce(sum(length(block)), 0) FROM {t}_data").fetchone()[0]
        n += db.execute(f"SELECT coalesce(sum(length(sz)), 0) FROM {t}_docsize").fetchone()[0]
        out[t] = n
    return out


def questions(ix: Index) -> dict:
    """hit@10, MRR@10 and latency per mode. The first search of a process loads the embedder,
    the vector set and the BM25 lengths; it is timed on its own ("first_search_ms") so that
    p50/p99 are those of a running daemon."""
    t = time.perf_counter()
    ix.search(QUESTIONS[0][0], k=10, unit="file", mode="hybrid")
    out: dict = {"first_search_ms": round(1000 * (time.perf_counter() - t), 1)}
    for mode in ("hybrid", "bm25", "vector"):
        hit, rr, times = 0, 0.0, []
        for q, want in QUESTIONS:
            t = time.perf_counter()
            hits = ix.search(q, k=10, unit="file", mode=mode)
            times.append(time.perf_counter() - t)
            ranks = [i for i, h in enumerate(hits, 1) if want in h.path]
            hit += bool(ranks)
            rr += 1 / ranks[0] if ranks else 0.0
        times.sort()
        out[mode] = {"hit@10": round(hit / len(QUESTIONS), 3),
                     "mrr@10": round(rr / len(QUESTIONS), 3),
                     "p50_ms": round(1000 * times[len(times) // 2], 1),
                     "p99_ms": round(1000 * times[-1], 1)}  # fmt: skip
    return out


def save_to_searchable(env, ix: Index, docs: Path, trials: int = 5) -> list[float]:
    cmd = [sys.executable, "-m", "localai", "index", "--watch"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stderr:
            if "watching" in line:
                break
        time.sleep(1.0)
        took = []
        for i in range(trials):
            word = f"zqxwatchword{i}{int(time.time())}"
            path = docs / f"bench-note-{i}.txt"
            t0 = time.perf_counter()
            path.write_text(f"A fresh note about {word} written while watching.\n")
            while time.perf_counter() - t0 < 60:
                if any(h.path == str(path) for h in ix.search(word, k=3, mode="bm25")):
                    took.append(round(time.perf_counter() - t0, 3))
                    break
                time.sleep(0.02)
            path.unlink()
            time.sleep(1.0)
        return took
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    work = Path(sys.argv[sys.argv.index("--work") + 1]) if "--work" in sys.argv else None
    work = work or Path("/tmp/localai-bench/pydoc")
    ensure_docs()
    docs = work / "html"
    if not docs.is_dir():
        shutil.copytree(DOC, docs, symlinks=False)
        # the reST sources repeat every page as text: index the pages once (a real ignore file)
        (docs / ".localaiignore").write_text("_sources/\n")
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    env = {**os.environ, "LOCALAI_HOME": str(home), "LOCALAI_MODELS": models}
    first = json.loads(cli(env, "index", str(docs), "--json").stdout)
    noop = json.loads(cli(env, "index", "--json").stdout)
    ix = open_index(load_settings(home, models_dir=models))
    comp = components(ix)
    tb = first["text_bytes"]
    result = {
        "bench": "index_pydoc", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"), "files": first["files"], "chunks": first["chunks"],
        "skipped": len(first["skipped"]), "text_bytes": tb, "index_bytes": first["index_bytes"],
        "first_index_s": first["seconds"],
        "chunks_per_s": round(first["embedded"] / first["seconds"], 1),
        "text_mb_per_s": round(tb / 1e6 / first["seconds"], 3),
        "noop_reindex_s": noop["seconds"],
        "noop_share_of_first": round(noop["seconds"] / first["seconds"], 5),
        "bytes_share_of_text": {"index": round(first["index_bytes"] / tb, 4),
                                **{k: round(v / tb, 4) for k, v in comp.items()}},
        "questions": questions(ix),
        "save_to_searchable_s": save_to_searchable(env, ix, docs),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
