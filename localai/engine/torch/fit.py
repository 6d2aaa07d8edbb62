"""Will a GGUF run on this machine, and how fast: a forecast from the file's header and two
rates measured once here (`localai fit`), before a byte of weights is loaded.

A decode step reads every weight a token uses once: the dense tensors (attention, norms, the
output head), and for a mixture of experts the k chosen experts of each layer. Those in RAM
stream through the quantized kernels at the measured matrix-vector rate; experts not in the
cache come from disk first, at the measured read rate. So, per token,

    compute = active bytes / matvec rate
    reads = (1 - hit rate) · active expert bytes / disk rate

and the band is [1 / (compute + reads), 1 / max(compute, reads)]: reads one after the other, or
reads hidden entirely behind compute by prefetching. The hit rate assumed is the cache's share
of all expert bytes, what a cache gets when routing is uniform (the worst case: real routers
reuse experts, so real hit rates are higher and the forecast is a floor).

The rates are measured with the runner's own kernels and reads (`probe`), cached per machine,
thread count and disk in the data dir.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .experts import parse_budget
from .gguf_header import read_header

# what the runner holds besides weights and KV: the interpreter, torch, buffers (peak RSS of
# the runner on bench/moe.py's OLMoE shape minus its dense weights, measured here: ~0.42 GB)
RUNTIME_BYTES = 448 << 20
PROBE_READ = 2 << 20  # one expert-sized read
PROBE_READS = 96


@dataclass
class Probe:
    disk_bytes_per_s: float  # parallel cold reads of expert-sized ranges
    matvec_bytes_per_s: float  # Q4_K weights through the runner's matrix-vector kernel
    threads: int
    key: str


def _key(path: Path, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}|threads={threads}|dev={os.stat(path).st_dev}"


def probe(home: Path, sample: Path, threads: int, refresh: bool = False) -> Probe:
    """The two rates, measured on `sample` (a large file on the models' disk) and cached in
    home/probe.json for this CPU, thread count and disk."""
    cache = Path(home) / "probe.json"
    key = _key(sample, threads)
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if not refresh and key in known:
        return Probe(**known[key])
    found = Probe(disk_rate(sample), matvec_rate(threads), threads, key)
    known[key] = asdict(found)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, cache)  # two probing processes: one whole file wins, never a torn one
    return found


def disk_rate(path: Path, io_threads: int = 4) -> float:
    """Bytes/s of expert-sized reads at spread offsets, 4 at a time (as the expert cache reads),
    each range dropped from the page cache first so that it comes from the disk."""
    size = os.path.getsize(path)
    n = max(1, min(PROBE_READS, size // PROBE_READ))
    step = max(PROBE_READ, (size - PROBE_READ) // n) // 4096 * 4096
    offsets = [i * step for i in range(n)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            os.posix_fadvise(fd, off, PROBE_READ, os.POSIX_FADV_DONTNEED)
        bufs = [bytearray(PROBE_READ) for _ in range(io_threads)]

        def read(i: int) -> int:
            return os.preadv(fd, [bufs[i % io_threads]], offsets[i])

        t = time.perf_counter()
        with ThreadPoolExecutor(io_threads) as pool:
            got = sum(pool.map(read, range(n)))
        dt = time.perf_counter() - t
        for off in offsets:  # leave the page cache as it was found
            os.posix_fadvise(fd, off, PROBE_READ, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return got / dt


def last_level_cache() -> int:
    """Bytes of the CPU's largest cache (sysfs; 32 MiB where it does not say)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 << 20)


def matvec_rate(threads: int, rows: int = 16384, cols: int = 4096) -> float:
    """Bytes/s of Q4_K weights through the runner's kernel, read from RAM as a decode step
    reads them: copies of a 36 MiB matrix, together twice the last-level cache, in turn (one
    matrix stays in a server's cache: 33 GB/s where decode reached 7)."""
    from . import native
    from .gguf_header import Tensor
    from .weights import QLinear

    kernel = native.load()
    if kernel is None:
        raise RuntimeError(f"the runner's kernels are not available: {native.status()}")
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * cols**-0.5
    raw = kernel.quantize(w, int(GGMLQuantizationType.Q4_K)).numpy()
    copies = max(1, -(-2 * last_level_cache() // raw.nbytes))
    ms = [QLinear([Tensor(GGMLQuantizationType.Q4_K, (rows, cols), raw.copy())], kernel)
          for _ in range(copies)]  # fmt: skip
    kernel.set_threads(threads)
    x = torch.randn(1, cols)
    for m in ms:
        m(x)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 1.0:
        for m in ms:
            m(x)
        n += len(ms)
    return n * ms[0].nbytes / (time.perf_counter() - t)


@dataclass
class Shape:
    """What the forecast needs from a GGUF header."""

    arch: str
    layers: int
    experts: int
    experts_used: int
    total_bytes: int
    expert_bytes: int  # all experts of all layers
    active_dense_bytes: int  # read per token: everything but experts and the embedding table
    kv_bytes_per_token: int  # fp16 K and V of every layer

    @property
    def active_expert_bytes(self) -> float:
        """The experts one token reads: k per layer."""
        per_expert = self.expert_bytes / max(1, self.layers * self.experts)
        return self.layers * self.experts_used * per_expert

    @property
    def active_bytes(self) -> float:
        return self.active_dense_bytes + self.active_expert_bytes


def tensor_bytes(qtype, dims) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return int(np.prod(dims)) // block * size


def read_shape(path: Path) -> Shape:
    md, infos, _ = read_header(Path(path))
    arch = md.get("general.architecture", "llama")

    def get(key, default=0):
        return int(md.get(f"{arch}.{key}", default) or default)

    sizes = {name: tensor_bytes(q, dims) for name, (q, dims, _) in infos.items()}
    experts = {n: b for n, b in sizes.items() if "_exps." in n}
    dense = {n: b for n, b in sizes.items() if n not in experts}
    if "output.weight" in dense:  # a separate head: the embedding is one row per token
        dense.pop("token_embd.weight", None)
    heads = get("attention.head_count", 1)
    head_dim = get("attention.key_length", get("embedding_length") // max(1, heads))
    kv_heads = get("attention.head_count_kv", heads)
    return Shape(arch, get("block_count"), get("expert_count"), get("expert_used_count"),
                 sum(sizes.values()), sum(experts.values()), sum(dense.values()),
                 get("block_count") * kv_heads * head_dim * 2 * 2)  # fmt: skip


def resident_bytes(shape: Shape) -> int:
    """What stays in RAM whatever the budgets: the weights a step reads and the runtime. An
    embedding table beside a separate head does not count (its rows are read from the memory
    map as tokens need them: 107 MB of the Qwen3 shape's file that `fit` counted, so it said
    "does not run" at caps where the runner ran)."""
    return int(shape.active_dense_bytes) + RUNTIME_BYTES


def split_ram(shape: Shape, ram: int, kv_bytes: int, paged_kv: bool,
              kv_budget: int | None = None, expert_budget: int | None = None,
              expert_floor: int = 0) -> tuple[int | None, int | None]:  # fmt: skip
    """The KV and expert budgets a RAM budget gives a model whose user named neither (a budget
    named is kept): after what stays resident, the KV cache (`kv_bytes` all in RAM) if it fits,
    in half of what is left for a mixture of experts, whose experts need the rest; else, when
    its pages can go to disk (`paged_kv`: an attention budget), a KV budget of that. Then the
    experts all in place if they fit in what the KV leaves, else a cache of that (at least
    `expert_floor`, the experts one layer holds while it computes). None: all in RAM / in
    place. A model that cannot run in `ram` raises ValueError saying what to change."""
    room = ram - resident_bytes(shape)
    moe = shape.expert_bytes > 0
    mib = 2**20
    if kv_budget is None:
        kv_room = room // 2 if moe else room
        if kv_bytes > kv_room and paged_kv:
            kv_budget = kv_room
        elif kv_bytes > room:
            raise ValueError(
                f"the KV cache needs {kv_bytes / mib:,.0f} MiB, and the RAM budget of "
                f"{ram / mib:,.0f} MiB leaves {max(0, room) / mib:,.0f} MiB after the weights and "
                "the runtime: lower the context length, quantize the KV cache (--k-bits, "
                "--v-bits), or give an attention budget (--attn-budget) so that its pages past "
                "what RAM holds live on disk"
            )
    if moe and expert_budget is None:
        rest = room - (kv_bytes if kv_budget is None else min(kv_budget, kv_bytes))
        if rest < shape.expert_bytes:
            if rest < max(expert_floor, 1):
                raise ValueError(
                    f"the RAM budget of {ram / mib:,.0f} MiB leaves {max(0, rest) / mib:,.0f} MiB "
                    f"for experts after the weights, the runtime and the KV cache; one layer's "
                    f"{expert_floor / mib:,.1f} MiB at least: raise the budget or lower the context"
                )
            expert_budget = rest
    return kv_budget, expert_budget


def forecast(shape: Shape, rates: Probe, ram_budget: int, context: int,
             budget: int | float | str | None = None) -> dict:  # fmt: skip
    """Whether `shape` runs in `ram_budget` with `context` tokens of KV, what stays resident,
    the expert cache, and a decode tok/s band (see the module docstring)."""
    kv = shape.kv_bytes_per_token * context
    resident = resident_bytes(shape)
    room = ram_budget - resident - kv
    cache = parse_budget(budget, shape.expert_bytes) if budget not in (None, "") else None
    if cache is None:
        cache = max(0, min(room, shape.expert_bytes))
    cache = min(cache, shape.expert_bytes)
    hit = cache / shape.expert_bytes if shape.expert_bytes else 1.0
    active_experts = shape.active_expert_bytes
    compute = shape.active_bytes / rates.matvec_bytes_per_s
    reads = (1 - hit) * active_experts / rates.disk_bytes_per_s
    runs = resident + kv + cache <= ram_budget and (shape.expert_bytes == 0 or cache > 0)
    return {
        "arch": shape.arch,
        "runs": bool(runs),
        "file_bytes": shape.total_bytes,
        "resident_bytes": resident,
        "kv_bytes": kv,
        "expert_bytes": shape.expert_bytes,
        "expert_cache_bytes": cache,
        "ram_budget_bytes": ram_budget,
        "hit_rate_uniform": round(hit, 4),
        "read_bytes_per_token": int((1 - hit) * active_experts),
        "tokens_per_s": round((1 / (compute + reads) + 1 / max(compute, reads)) / 2, 3),
        "tokens_per_s_low": round(1 / (compute + reads), 3),
        "tokens_per_s_high": round(1 / max(compute, reads), 3),
        "disk_bytes_per_s": round(rates.disk_bytes_per_s),
        "matvec_bytes_per_s": round(rates.matvec_bytes_per_s),
    }
