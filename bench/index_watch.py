"""Save-to-searchable time on an existing index: `localai index --watch` runs in a subprocess, a
new file is written into the first source, and a search (BM25, in-process) polls until it finds
the file's unique word. Five trials; prints one JSON object. The default work folder is the one
bench/index_nfcorpus.py built (3,633 files, 7,241 chunks).

    python bench/index_watch.py [--work /tmp/localai-bench/nfcorpus]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_pydoc import save_to_searchable  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.runtime import open_index  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench/nfcorpus"))
    args = ap.parse_args()
    home = args.work / "home"
    models = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))
    env = {**os.environ, "LOCALAI_HOME": str(home), "LOCALAI_MODELS": models}
    ix = open_index(load_settings(home, models_dir=models))
    source = Path(ix.sources()[0]["path"])
    took = save_to_searchable(env, ix, source)
    print(json.dumps({"bench": "index_watch", "machine": f"{platform.machine()} {os.cpu_count()}"
                      " cpus", "date": time.strftime("%Y-%m-%d"), "chunks": ix.stats()["chunks"],
                      "save_to_searchable_s": took,
                      "median_s": sorted(took)[len(took) // 2] if took else None}))  # fmt: skip


if __name__ == "__main__":
    main()
