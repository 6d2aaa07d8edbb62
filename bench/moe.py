"""MoE expert offloading: decode speed of a shape-faithful mixture of experts under a RAM cap.

    python bench/moe.py --shape olmoe            # 16 layers, 64 experts, top-8 (~4 GB)
    python bench/moe.py --shape qwen3-30b-a3b    # 48 layers, 128 experts, top-8 (~17 GB)

Writes the GGUF once into a scratch folder (random weights in the shapes and block formats of
the real model; never committed), then, for each expert budget (a share of all expert bytes),
runs each side in its own memory cgroup (v1, `memory.limit_in_bytes` counts the page cache)
capped at the same bytes, after dropping the page cache:

  (a) llama.cpp on the same file with mmap (its AVX2 load-time repack off: repacked weights
      are copies, which could not be paged out; with it on it is killed under the cap)
  (b) the runner reading every expert when used (no cache, no prefetch)
  (c) the runner with its expert cache, no prefetch (side "cache": the default eviction
      policy, "freq"; side "lru": least recently used out first, as before 2026-12-06)
  (d) the cache with prefetch (the next layer's router applied a layer early)
  (e) everything resident (no cap, file in the page cache): the compute floor

The cap is the runner's resident RSS without experts (measured by (b)) plus the budget. Each run
decodes `--warmup` tokens (the cache fills) then `--tokens` timed ones, greedily, from the same
prompt; the runner's token ids must be identical in (b)-(e). Random routers route almost
uniformly: the worst case for a cache (hit rate ≈ the budget's share); real routing reuses
experts. The physical bound is missed bytes ÷ disk rate + active bytes ÷ kernel rate, with the
rates of `localai fit`'s probe, and `fit`'s forecast is printed beside each measurement.
Needs root (cgroup, drop_caches). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the MoE GGUF writer the tests use

SHAPES = {
    # layers, dim, heads, kv heads, experts, top-k, expert FFN; Q4_K gate/up, Q6_K down
    "olmoe": dict(arch="olmoe", layers=16, dim=2048, heads=16, kv_heads=16, experts=64, used=8,
                  ffn=1024),
    "qwen3-30b-a3b": dict(arch="qwen3moe", layers=48, dim=2048, heads=32, kv_heads=4,
                          experts=128, used=8, ffn=768),
}  # fmt: skip
CGROUP = Path("/sys/fs/cgroup/memory")
PROMPT = [1, 504, 3458, 314, 260, 3092, 28, 2734]  # a fixed start (any ids in the vocabulary)


def feed(n: int, seed: int = 1) -> list[int]:
    """The tokens each step is given: fixed random ids, not the model's own choices (random
    weights repeat one token when left to choose, and a repeated token routes identically,
    which would flatter any cache)."""
    return np.random.default_rng(seed).integers(300, 40000, n).tolist()


def tokenizer_source() -> Path:
    from localai.config import load_settings
    from localai.runtime import open_catalog

    return open_catalog(load_settings()).ensure("smollm2-135m")


def row_pool(seed: int = 0, pool: int = 4096):
    """expert_rows for moe_gguf.build: rows drawn from a pool quantized once per format."""
    from localai.engine.torch import native

    kernel, gen, rng, made = native.load(), torch.Generator().manual_seed(seed), None, {}
    rng = np.random.default_rng(seed)

    def rows(qtype, n, cols, std):
        key = (int(qtype), cols, std)
        if key not in made:
            x = torch.randn(pool, cols, generator=gen) * std
            made[key] = kernel.quantize(x, int(qtype)).numpy()
        return made[key][rng.integers(0, pool, n)]

    return rows


def make_model(shape: str, folder: Path) -> Path:
    from moe_gguf import build

    path = folder / f"synthetic-{shape}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        s = dict(SHAPES[shape])
        tmp = path.with_suffix(".part")
        build(tmp, s.pop("arch"), tokenizer_source(), **s, expert_rows=row_pool())
        tmp.rename(path)
    return path


# -- one side, in its own process ----------------------------------------------------------------
def worker(args: dict) -> dict:
    """Decode greedily in this process (placed in its cgroup by the parent)."""
    if args["side"] == "llama":
        return llama_worker(args)
    from localai.engine.torch import TorchEngine

    budget = {"none": None, "ondemand": 1}.get(args["budget"], args["budget"])
    eng = TorchEngine(args["model"], context_length=512, threads=args["threads"],
                      expert_budget=budget, expert_prefetch=args["prefetch"],
                      expert_policy=args.get("policy", "freq"))  # fmt: skip
    model, ids, given = eng.model, [], feed(args["warmup"] + args["tokens"])
    eng._threads(args["threads"])

    def step(tok: int) -> None:  # the step's choice is kept to compare runs, not fed back
        ids.append(int(model.forward(torch.tensor([tok]))[-1].argmax()))

    model.forward(torch.tensor(PROMPT))
    for tok in given[: args["warmup"]]:
        step(tok)
    cache = model.expert_cache
    before = eng._extra_stats(None)
    t = time.perf_counter()
    for tok in given[args["warmup"] :]:
        step(tok)
    dt = time.perf_counter() - t
    out = {"tokens_per_s": args["tokens"] / dt, "ids": ids, "rss_bytes": peak_rss()}
    if cache is not None:
        d = eng._extra_stats(before)
        guess = {k: d[k] for k in ("prefetch_precision", "prefetch_recall") if k in d}
        read = d["expert_bytes_read"] / args["tokens"]
        out |= {"hit_rate": d["expert_hit_rate"], "read_bytes_per_token": read, **guess}
    return out


def llama_worker(args: dict) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def no_repack():  # weights stay in the memory map, which the cgroup can page out
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = no_repack
    llm = llama_cpp.Llama(args["model"], n_ctx=512, n_threads=args["threads"], use_mmap=True,
                          verbose=False)  # fmt: skip
    given = feed(args["warmup"] + args["tokens"])
    llm.eval(PROMPT)
    for tok in given[: args["warmup"]]:
        llm.eval([tok])
    t = time.perf_counter()
    for tok in given[args["warmup"] :]:
        llm.eval([tok])
    return {"tokens_per_s": args["tokens"] / (time.perf_counter() - t), "rss_bytes": peak_rss()}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the parent: cgroups, page cache, the table ------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_capped(args: dict, cap: int | None) -> dict:
    """Run one side in a fresh cgroup limited to `cap` bytes (None: no cap, page cache kept)."""
    group = CGROUP / f"localai-bench-{os.getpid()}"
    if cap is not None:
        drop_caches()
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap))
    cmd = [sys.executable, __file__, "--worker", json.dumps(args)]
    enter = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if cap else None
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter)
    peak = int((group / "memory.max_usage_in_bytes").read_text()) if cap else None
    if cap is not None:
        group.rmdir()
    if r.returncode != 0:
        killed = r.returncode in (-9, 137)
        return {"error": "killed under the cap (out of memory)" if killed
                else r.stderr.strip().splitlines()[-1:], "peak_bytes": peak}  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1]) | {"peak_bytes": peak}


def bounds(shape, rates, read_bytes_per_token: float) -> dict:
    """tokens/s at the probed rates for a side that read `read_bytes_per_token` from disk:
    reads then compute one after the other, and reads hidden behind compute (prefetch's best)."""
    per_expert = shape.expert_bytes / (shape.layers * shape.experts)
    active = shape.active_dense_bytes + shape.layers * shape.experts_used * per_expert
    compute, reads = (
        active / rates.matvec_bytes_per_s,
        read_bytes_per_token / rates.disk_bytes_per_s,
    )
    return {"bound_serial": round(1 / (compute + reads), 3),
            "bound_overlapped": round(1 / max(compute, reads), 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=list(SHAPES), default="olmoe")
    ap.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 75])
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=16, help="steps before timing (cache fills)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", nargs="+", default=["llama", "ondemand", "cache", "prefetch"])
    ap.add_argument(
        "--skip-resident",
        action="store_true",
        help="no all-resident run (e) (the file does not fit in free RAM)",
    )
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache/localai-bench/moe")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    from localai.engine.torch import native
    from localai.engine.torch.fit import forecast, probe, read_shape

    t0 = time.time()
    assert native.load() is not None, native.status()  # built here, not inside a capped worker
    model = make_model(a.shape, a.dir)
    shape = read_shape(model)
    drop_caches()
    rates = probe(a.dir, model, a.threads, refresh=True)
    base = {"model": str(model), "threads": a.threads, "warmup": a.warmup, "tokens": a.tokens}
    # the runner's peak RSS with no expert kept: every expert read when used, then dropped
    resident = run_capped(base | {"side": "runner", "budget": "ondemand", "prefetch": False},
                          None)["rss_bytes"]  # fmt: skip
    if a.skip_resident:  # a file larger than free RAM: token identity is checked against (b)
        full = run_capped(base | {"side": "runner", "budget": "ondemand", "prefetch": False}, None)
        full["tokens_per_s"] = float("nan")
    else:
        subprocess.run(["cat", str(model)], stdout=subprocess.DEVNULL, check=True)  # all in RAM
        full = run_capped(base | {"side": "runner", "budget": "none", "prefetch": False}, None)
    rows = []
    for pct in a.budgets:
        budget = shape.expert_bytes * pct // 100
        cap = resident + budget + (64 << 20)
        row = {"budget_pct": pct, "budget_bytes": budget, "cap_bytes": cap,
               "fit": forecast(shape, rates, cap, 512, budget)}  # fmt: skip
        for side in a.sides:
            args = base | {"side": "llama" if side == "llama" else "runner",
                           "budget": "ondemand" if side == "ondemand" else budget,
                           "prefetch": side == "prefetch",
                           "policy": "lru" if side == "lru" else "freq"}  # fmt: skip
            got = run_capped(args, cap)
            if "ids" in got:
                got["identical"] = got.pop("ids") == full["ids"]
                got |= bounds(shape, rates, got.get("read_bytes_per_token", 0))
                got["of_bound"] = round(got["tokens_per_s"] / got["bound_serial"], 3)
            row[side] = got
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    out = {"bench": "moe", "shape": a.shape, **SHAPES[a.shape], "file_bytes": shape.total_bytes,
           "expert_bytes": shape.expert_bytes, "resident_rss_bytes": resident,
           "disk_bytes_per_s": round(rates.disk_bytes_per_s),
           "matvec_bytes_per_s": round(rates.matvec_bytes_per_s),
           "all_resident_tokens_per_s": round(full["tokens_per_s"], 3),
           "routing": "random routers: near-uniform, the worst case for a cache",
           "rows": rows, "seconds": round(time.time() - t0)}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
