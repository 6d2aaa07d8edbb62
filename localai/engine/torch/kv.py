"""The paged, quantized KV cache: static, preallocated for the whole context at load time.

Layout (KIVI): tokens older than a full-precision window are quantized in pages of 16 tokens;
K per channel (one scale/min per channel for each group of `k_group` tokens, because keys have
outlier channels that per-token blocks cannot hold), V per token (one scale/min per `v_group`
channels). K and V bits are independent, each one of 16 (fp16, no scales), 8, 4 or 2.
The first `sink` tokens of a quantized K or V are also kept in fp16 (a fixed cost): the
attention sink draws a large share of every query's attention, so its error reaches every
output, and its outlier keys would otherwise set the range of the whole first K group.

Invariants, with n tokens stored and W = window, G = k_group:
- tokens [0, qend(n)) live in pages, where qend(n) = max(0, (n - W) // G · G): quantization
  happens a whole K group at a time, once the group is more than W tokens old;
- tokens [qend(n), n) live in the fp16 buffer, at index (token - qend(n)); n - qend(n) < W + G;
- a query at position p sees keys j < qend(p + 1) through their quantized values (tokens
  [0, sink) through their fp16 copy) and the rest in fp16, in prefill as in decode, so
  perplexity measures exactly what generation sees.
Pages are addressable (page i = tokens [16i, 16i + 16)). With a `page_summary` each page also
keeps a summary that sparse decode attention scores pages by (attention.py). "meanstd" and
"minmax" are a per-channel centre and spread of its keys, taken before quantization (2 fp16 rows
per 16 tokens, +6.25% of fp16 K/V): their mean and standard deviation, or the middle and
half-width of their range (the box that holds them). "keys" keeps a 4-bit copy of every key
instead (per channel, per K group, as K is quantized; 1/4 of fp16 K, +12.5% of fp16 K/V in
RAM), stored channel by channel (`kcopy` [L, H, D, T/2]) so that a step reads only the
`score_channels` channels its query weighs most (SparQ's observation: a few channels of q carry
most of q . k); the others count at their K group's mean (`kcmu`). A page then scores as its
best token, which finds the one key a query picks out (a needle, the earlier copy of a passage)
that a page's mean and spread blur. With `estimate_rest` each page also keeps the mean of its
values (4-bit, one scale and minimum: +0.9% of fp16 K/V): a sparse step adds every page it does
not read as one token standing for its 16, the page's mean value, scored by its keys' mean
(from the centre, or from the copy's scores), an estimate of the attention it would get.

Pages in RAM or on disk: by default the pages' codes (K codes, V codes, V scales) are tensors
[L, H, T, ·] allocated for the whole context, and a selected page is read in place. With a
`kv_ram` budget they go to a file instead (native/kv_pages.cpp: one record of `rec` bytes per
layer, head and page, written once when quantized), and a pool in RAM, what the budget leaves,
holds the ones read lately: a decode step makes its selected pages resident before it attends;
a prompt's chunks read a layer's pages from the file. The K group scales, the sinks, the page
summaries and the fp16 window stay in RAM: they are what selection and every step read.

A cache can be cut back to a prefix (`truncate`) so the next prompt that shares it is not
computed again. Cutting back to m < n needs tokens [qend(m), m) in fp16: at 16 bits the pages
hold them exactly and are copied back into the buffer; quantized pages cannot give the fp16
values back, so a quantized cache also keeps its newest `held` quantized tokens in fp16
(`kprev`, `vprev`: tokens [exact_from, qend(n))), and a cut back into them is exact too: a
cut of up to `held` tokens (256 by default; up to held + window + K group - 1 when the last
group was quantized a while ago), a chat turn that regenerates an answer or whose template
differs from the last turn's in its final tokens, keeps the whole conversation before it. A
cut further back starts over (never a silently less exact cache).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kvquant

# L layers, H KV heads, T tokens (capacity), D head dim, R packed bytes per row, C new tokens
PAGE = 16
READ_AHEAD = 1  # pages on disk: layers ahead whose pages of the step before are read meanwhile
BITS = (16, 8, 4, 2)
SUMMARIES = ("", "meanstd", "minmax", "keys")
COPY_BITS = 4  # the "keys" summary's copy of the keys
VCENT_BITS = 4  # page value means (estimate_rest): codes, then an fp16 scale and minimum


@dataclass(frozen=True)
class KVConfig:
    k_bits: int = 16
    v_bits: int = 16
    window: int = 128  # most recent tokens kept in fp16
    k_group: int = 128  # tokens per K scale (per channel); a multiple of PAGE
    v_group: int = 64  # channels per V scale (per token); divides the head dim
    sink: int = 32  # first tokens kept in fp16 (attention sink); a multiple of PAGE, < k_group
    v_clip: bool = False  # search each V group's range for the least squared error
    v_rotate: bool = False  # quantize V times an orthonormal Hadamard matrix (see `hadamard`)
    # V symmetric around 0: code·scale - (2^b - 1)/2·scale, no minimum stored (rotated V is
    # centred: BENCHMARKS.md, "KV cache")
    v_sym: bool = False
    page_summary: str = ""  # "meanstd", "minmax", "keys" or "" (none): sparse attention
    # "keys": channels of the copy a step reads per KV head (0: all); the engine reads a quarter
    # of the head dim (16 of 64: qwen2.5-coder-0.5b; 32 of 128: the 1.5B, where 16 missed a
    # needle of 10 and copied 14% worse at 8K, BENCHMARKS.md "32K")
    score_channels: int = 16
    # a KV head's page score from its query heads': their "max" (default: better at 8K on
    # qwen2.5-coder-0.5b, BENCHMARKS.md) or "mass" (softmax over pages per head, summed)
    page_score: str = "max"
    # sparse decode adds the pages it skips as estimates (page centre key, mean value)
    estimate_rest: bool = True
    # a quantized cache's newest quantized tokens also kept in fp16, so that a cut back into
    # them (`truncate`) is exact: 256 is 1.6% of fp16 K/V at 32K, 12.5% at 2K
    held: int = 256

    def __post_init__(self) -> None:
        for b in (self.k_bits, self.v_bits):
            assert b in BITS, f"KV bits must be one of {BITS}, not {b}"
        assert self.k_group % PAGE == 0 and self.window >= 0
        assert self.sink % PAGE == 0 and 0 <= self.sink < self.k_group
        assert self.page_summary in SUMMARIES, f"page_summary: one of {SUMMARIES}"
        assert self.page_score in ("mass", "max")
        assert self.score_channels >= 0 and self.held >= 0

    @property
    def selection_flags(self) -> int:
        """The page selection as the C++ step reads it: bit 0 meanstd, bit 1 mass."""
        return (self.page_summary == "meanstd") | (self.page_score == "mass") << 1


def row_bytes(bits: int, d: int) -> int:
    return 2 * d if bits == 16 else d * bits // 8


class KVCache:
    def __init__(self, cfg: KVConfig, n_layers: int, n_heads: int, head_dim: int, capacity: int,
                 kv_ram: int | str | None = None, kv_dir: Path | None = None,
                 read_ahead: int = READ_AHEAD):  # fmt: skip
        """`kv_ram`: RAM for the whole cache (bytes, or a share of what it holds all in RAM,
        see experts.parse_budget); the pages' codes beyond what the fixed parts leave live in
        a file under `kv_dir` (default: the temp dir); while a layer attends, the pages the
        next `read_ahead` layers read at the step before are read back in the background
        (kv_pages.cpp). None: everything in RAM."""
        g = cfg.k_group
        self.cfg, self.L, self.H, self.D = cfg, n_layers, n_heads, head_dim
        self.T = -(-capacity // g) * g  # whole K groups
        assert head_dim % cfg.v_group == 0 or cfg.v_bits == 16
        L, H, T, D = n_layers, n_heads, self.T, head_dim
        self.vgs = D // cfg.v_group if cfg.v_bits < 16 else 0  # V scale groups per token
        self.vms = 0 if cfg.v_sym else self.vgs  # V minimums per token (none when symmetric)
        # one page of one head: K codes, V codes, V scales, V minimums (kv_pages.cpp)
        v_bytes = row_bytes(cfg.v_bits, D) + 2 * (self.vgs + self.vms)
        self.rec = PAGE * (row_bytes(cfg.k_bits, D) + v_bytes)
        spill = bool(kv_ram)  # then the codes live in the page file and pool
        self.kc, self.ks, self.km = self._store(cfg.k_bits, (L, H, T // g, D), not spill)
        v_scales = (L, H, T, D // cfg.v_group) if cfg.v_bits < 16 and not spill else (0,)
        self.vc, self.vs, self.vm = self._store(cfg.v_bits, v_scales, not spill)
        if cfg.v_sym:
            self.vm = torch.empty(0, dtype=torch.float16)
        pages = (L, H, T // PAGE, D)
        spread = cfg.page_summary in ("meanstd", "minmax")
        self.kcent = torch.empty(pages if spread else (0,), dtype=torch.float16)  # L, H, T/16, D
        self.kspread = torch.empty_like(self.kcent)
        copy = cfg.page_summary == "keys"
        self.kcopy = torch.empty((L, H, D, T * COPY_BITS // 8) if copy else (0,), dtype=torch.uint8)
        groups = (L, H, T // g, D) if copy else (0,)
        # the copy's per-channel scale, minimum and mean per K group
        self.kcs, self.kcm, self.kcmu = (torch.empty(groups, dtype=torch.float16) for _ in "smu")
        rest = (L, H, T // PAGE, vcent_bytes(D)) if cfg.page_summary and cfg.estimate_rest else (0,)
        self.vcent = torch.empty(rest, dtype=torch.uint8)  # L, H, T/16, D/2 + 4
        self.ksink = self._sink(cfg.k_bits)  # L, H, S, D (empty at 16 bits)
        self.vsink = self._sink(cfg.v_bits)
        rotate = cfg.v_rotate and cfg.v_bits < 16
        self.v_rot = hadamard(head_dim) if rotate else torch.empty(0)  # D, D (fp32)
        cap = cfg.window + g
        self.kbuf = torch.zeros(L, H, cap, D, dtype=torch.float16)  # L, H, W+G, D
        self.vbuf = torch.zeros(L, H, cap, D, dtype=torch.float16)
        held = cfg.held if cfg.k_bits < 16 or cfg.v_bits < 16 else 0
        self.kprev = torch.zeros(L, H, held, D, dtype=torch.float16)  # L, H, held, D
        self.vprev = torch.zeros_like(self.kprev)
        self.exact_from = 0  # with kprev: it holds tokens [exact_from, qend(n)) from index 0
        self.pages = self._spill(kv_ram, kv_dir, read_ahead) if spill else None
        self.n = 0  # tokens stored (all layers agree between forwards)
        self._n_next = 0
        self._high = 0  # the most quantized tokens ever stored: the per-token parts touched
        self.ids: list[int] = []  # the token ids of those n tokens, when a model wrote them
        self._ids: list[int] = []

    def _store(self, bits: int, scale_shape: tuple[int, ...], codes: bool = True):
        """Codes and scales, allocated for the whole context but not written (torch.empty): the
        OS gives them RAM page by page as tokens arrive, so a long context costs RAM only once
        it is used; nothing reads past the tokens stored."""
        L, H, T, D = self.L, self.H, self.T, self.D
        if not codes:  # in the page file; only K's group scales stay here
            return (torch.empty(0, dtype=torch.uint8), *self._store(bits, scale_shape)[1:])
        if bits == 16:
            empty = torch.empty(0, dtype=torch.float16)
            return torch.empty(L, H, T, D, dtype=torch.float16), empty, empty
        codes = torch.empty(L, H, T, D * bits // 8, dtype=torch.uint8)  # L, H, T, R
        return (
            codes,
            torch.empty(scale_shape, dtype=torch.float16),
            torch.empty(scale_shape, dtype=torch.float16),
        )

    @property
    def fixed_bytes(self) -> int:
        """RAM the cache needs whatever its pages: the fp16 window (and the quantized tokens
        held in fp16), the sinks, the page summaries, the K group scales, and (pages on disk)
        the page table."""
        parts = (self.ks, self.km, self.kbuf, self.vbuf, self.kprev, self.vprev, self.ksink,
                 self.vsink, *self._summaries)  # fmt: skip
        return sum(t.nbytes for t in parts) + self.L * self.H * (self.T // PAGE) * 4

    def _spill(self, kv_ram: int | str, spill_dir: Path | None, ahead: int):
        from . import native
        from .experts import parse_budget

        pages = self.L * self.H * (self.T // PAGE)
        all_ram = self.fixed_bytes - pages * 4 + pages * self.rec  # the cache all in RAM
        budget = parse_budget(kv_ram, all_ram, "a KV budget")
        slots = (budget - self.fixed_bytes) // self.rec
        if slots < 1:
            raise ValueError(
                f"a KV budget of {budget / 2**20:.1f} MiB leaves no room for pages: the fp16 "
                f"window, sinks, page summaries and K scales take {self.fixed_bytes / 2**20:.1f}"
            )
        kernel = native.load()
        if kernel is None:
            raise ValueError(f"KV pages on disk need the C++ kernels ({native.status()})")
        where = Path(spill_dir or tempfile.gettempdir())
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = where / f"kv-{os.getpid()}-{id(self):x}.pages"  # unlinked once open
        return kernel.KVPages(str(path), self.L, self.H, self.T // PAGE, self.rec, slots, ahead)

    def _sink(self, bits: int) -> torch.Tensor:
        if bits == 16 or not self.cfg.sink:
            return torch.empty(0, dtype=torch.float16)
        return torch.zeros(self.L, self.H, self.cfg.sink, self.D, dtype=torch.float16)

    # -- bookkeeping ------------------------------------------------------------------------
    def qend(self, n: int) -> int:
        g = self.cfg.k_group
        return max(0, (n - self.cfg.window) // g * g)

    @property
    def nbytes(self) -> int:
        """Bytes in RAM (with pages on disk: the pool, not the file)."""
        pool = self.pages.pool.nbytes + self.pages.table.nbytes if self.pages else 0
        return sum(t.nbytes for t in (*self._parts(), self.kprev, self.vprev)) + pool

    def resident_bytes(self) -> int:
        """Bytes in RAM now: the fixed parts, and the per-token parts as far as tokens have ever
        been stored in them (`nbytes` is what the whole context would take)."""
        if self.pages is not None:
            return self.nbytes
        share = self._high / self.T
        grows = (self.kc, self.ks, self.km, self.vc, self.vs, self.vm, *self._summaries)
        return self.nbytes - int(sum(t.nbytes for t in grows) * (1 - share))

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return (self.kc, self.ks, self.km, self.vc, self.vs, self.vm, self.kbuf, self.vbuf,
                self.ksink, self.vsink, *self._summaries)  # fmt: skip

    @property
    def _summaries(self) -> tuple[torch.Tensor, ...]:
        """The parts sparse steps read: per page the key centre and spread and the value mean,
        and the keys' copy (codes, and per K group scales, minimums, means)."""
        return self.kcent, self.kspread, self.vcent, self.kcopy, self.kcs, self.kcm, self.kcmu

    def summary_read_bytes(self, pages: int) -> int:
        """Bytes of summaries a sparse step over `pages` quantized pages reads, all layers: the
        page summaries, the value means, and of the copy the `score_channels` channels' codes,
        scales and minimums and every channel's group mean."""
        per_page = sum(t.nbytes for t in (self.kcent, self.kspread, self.vcent)) * PAGE / self.T
        share = min(self.cfg.score_channels or self.D, self.D) / self.D
        copy = sum(t.nbytes for t in (self.kcopy, self.kcs, self.kcm)) * share + self.kcmu.nbytes
        return int(pages * per_page + copy * pages * PAGE / self.T)

    def _page_token_bytes(self) -> float:
        """Bytes of one token in pages, all layers: its codes and V scales, its share of the K
        group scales."""
        return self.rec / PAGE * self.H * self.L + (self.ks.nbytes + self.km.nbytes) / self.T

    def bytes_per_token(self) -> float:
        """Marginal cost of one more token in pages and their summaries (the fp16 buffer and
        sink are fixed costs), wherever they are (RAM or the page file)."""
        return self._page_token_bytes() + sum(t.nbytes for t in self._summaries) / self.T

    def offloaded_bytes(self) -> int:
        """Bytes of pages on disk and not in the pool now."""
        if self.pages is None:
            return 0
        written = self.qend(self.n) // PAGE * self.L * self.H
        return max(0, written - self.pages.stats()[3]) * self.rec

    def read_bytes(self, n: int, keep: int = 0) -> int:
        """Bytes a decode step over n tokens reads from the cache, all layers: every quantized
        token (or `keep` pages of them per head, and the summaries), and the fp16 window."""
        q = self.qend(n)
        per_token = self._page_token_bytes()
        window = (n - q) * self.L * self.H * self.D * 2 * 2  # fp16 K and V
        if not keep:
            return int(q * per_token) + window
        return int(keep * PAGE * per_token) + self.summary_read_bytes(q // PAGE) + window

    def reset(self) -> None:
        self.n = self._n_next = self.exact_from = 0
        self.ids = []
        if self.pages is not None:
            self.pages.reset()

    def begin(self, n_new: int) -> None:
        """Start a forward over `n_new` tokens; every layer then calls `write` once."""
        assert self.n + n_new <= self.T, "the engine checks context room before running"
        self._n_next = self.n + n_new
        self._ids, self.ids = self.ids, []  # unknown until every layer has written

    def commit(self, ids: list[int] | None = None) -> None:
        """End the forward; `ids` are its token ids (None: not tokens, the cache is unnamed)."""
        self._hold(self._n_next)
        if ids is not None and len(self._ids) + len(ids) == self.n:
            self._ids.extend(ids)  # in place: a decode step appends one id, not a copy of all
            self.ids = self._ids

    def _hold(self, n: int) -> None:
        self.n = self._n_next = n
        self._high = max(self._high, self.qend(n))
        if self.kprev.shape[2]:
            self.exact_from = max(self.exact_from, self.qend(n) - self.kprev.shape[2])

    def adopt(self, ids: list[int], exact_from: int) -> None:
        """The tensors now hold these tokens' K/V, written in place (a restored snapshot), and
        `kprev` the quantized ones from `exact_from` on."""
        self.exact_from = exact_from
        self._hold(len(ids))
        self.ids = self._ids = list(ids)

    def truncate(self, m: int) -> int:
        """Keep tokens [0, m) and forget the rest; returns the tokens kept (m, or 0)."""
        n = self.n
        if m >= n:
            return n
        if len(self.ids) < m:  # not written by a model (tests), or a forward did not finish
            self.reset()
            return 0
        q_old, q_new = self.qend(n), self.qend(m)
        held = self.kprev.shape[2]
        if q_new < q_old:
            if held and q_new < self.exact_from:  # quantized, and not held in fp16
                self.reset()
                return 0
            shift = q_old - q_new  # tokens [q_new, q_old) come back in fp16
            kept = max(0, m - q_old)  # buffered tokens still wanted, moved up by `shift`
            top = min(m, q_old)
            for layer in range(self.L):
                if held:  # [q_new, top) from the fp16 copy, which then ends at q_new
                    e = self.exact_from
                    kc, vc = self.kprev[layer, :, q_new - e :], self.vprev[layer, :, q_new - e :]
                else:  # the fp16 pages themselves
                    kc, vc = (t[:, q_new:] for t in self._stored(layer, top)[:2])
                for buf, exact in ((self.kbuf[layer], kc), (self.vbuf[layer], vc)):
                    buf[:, shift : shift + kept] = buf[:, :kept].clone()
                    buf[:, : top - q_new] = exact[:, : top - q_new]
        self.n = self._n_next = m
        self.ids = self.ids[:m]
        return m

    # -- writing ----------------------------------------------------------------------------
    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's K, V ([H, C, D]) for `layer`; returns fp16-rounded K, V of tokens
        [qend(n), n + C) as fp32 (the buffer's old tokens followed by the new ones)."""
        n, n2 = self.n, self._n_next
        q0, q1 = self.qend(n), self.qend(n2)
        kb, vb = self.kbuf[layer], self.vbuf[layer]
        if q1 == q0:  # the common decode case: the new tokens fit in the buffer
            kb[:, n - q0 : n2 - q0] = k
            vb[:, n - q0 : n2 - q0] = v
            return kb[:, : n2 - q0].float(), vb[:, : n2 - q0].float()
        kf = torch.cat([kb[:, : n - q0], k.half()], dim=1)  # H, n2 - q0, D
        vf = torch.cat([vb[:, : n - q0], v.half()], dim=1)
        if self.kprev.shape[2]:
            self._hold_exact(layer, kf[:, : q1 - q0], vf[:, : q1 - q0], q0)
        kcodes = self._quantize_k(layer, kf[:, : q1 - q0].float(), q0)
        self._put(layer, q0, kcodes, *self._quantize_v(layer, vf[:, : q1 - q0].float(), q0))
        kb[:, : n2 - q1] = kf[:, q1 - q0 :]
        vb[:, : n2 - q1] = vf[:, q1 - q0 :]
        return kf.float(), vf.float()

    def _hold_exact(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Keep the fp16 K, V ([H, C, D]) of tokens [start, start + C), about to be quantized,
        in `kprev`/`vprev` after the ones held, as many of the newest as they take."""
        e, end, held = self.exact_from, start + k.shape[1], self.kprev.shape[2]
        lo = max(e, end - held)  # the first token held after this forward (`_hold`)
        for prev, new in ((self.kprev[layer], k), (self.vprev[layer], v)):
            both = torch.cat([prev[:, : start - e], new], dim=1)  # tokens [e, end)
            prev[:, : end - lo] = both[:, lo - e :]

    def _put(self, layer: int, start: int, kc, vc, vs, vm) -> None:
        """Store the codes of tokens [start, start + C): kc, vc [H, C, R] (fp16 [H, C, D] at 16
        bits), vs, vm [H, C, D/v_group] (None at 16 bits; vm None with symmetric V)."""
        c = kc.shape[1]
        if self.pages is None:
            self.kc[layer, :, start : start + c] = kc
            self.vc[layer, :, start : start + c] = vc
            if vs is not None:
                self.vs[layer, :, start : start + c] = vs
            if vm is not None:
                self.vm[layer, :, start : start + c] = vm
            return
        rows = [t for t in (kc, vc, vs, vm) if t is not None]  # a page: each part's 16 rows
        parts = [t.contiguous().view(torch.uint8).reshape(self.H, c // PAGE, -1) for t in rows]
        self.pages.write(layer, start // PAGE, torch.cat(parts, dim=2).contiguous())

    def _stored(self, layer: int, tok: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`layer`'s K codes, V codes, V scales, V minimums ([H, T', ·], as the tensors hold
        them), covering the tokens `tok` (see `_take`): the tensors, or pages read from disk."""
        if self.pages is None:
            return tuple(t[layer] if t.numel() else t for t in (self.kc, self.vc, self.vs, self.vm))
        n = tok if isinstance(tok, int) else int(tok.max()) + 1 if tok.numel() else 0
        pages = -(-n // PAGE)
        recs = self.pages.read(layer, pages)  # H, pages, rec
        cfg, H, D = self.cfg, self.H, self.D
        widths = [row_bytes(cfg.k_bits, D), row_bytes(cfg.v_bits, D), 2 * self.vgs, 2 * self.vms]
        out, at = [], 0
        for bits, w in zip((cfg.k_bits, cfg.v_bits, 16, 16), widths, strict=True):
            if not w:  # no V scales at 16 bits, no minimums with symmetric V
                out.append(torch.empty(0, dtype=torch.float16))
                continue
            part = recs[:, :, at : at + PAGE * w].reshape(H, pages * PAGE, w)
            at += PAGE * w
            out.append(part.contiguous().view(torch.float16) if bits == 16 else part)
        return tuple(out)

    def _quantize_k(self, layer: int, k: torch.Tensor, start: int) -> torch.Tensor:
        """k: [H, C, D] tokens [start, start + C), C a multiple of the K group; sets the group
        scales and the page summaries, returns the codes (`_put` stores them)."""
        bits, g, c = self.cfg.k_bits, self.cfg.k_group, k.shape[1]
        if self.kcent.numel():
            cent, spread = page_summary(k.reshape(self.H, c // PAGE, PAGE, self.D), self.cfg)
            self.kcent[layer, :, start // PAGE : (start + c) // PAGE] = cent
            self.kspread[layer, :, start // PAGE : (start + c) // PAGE] = spread
        if self.kcopy.numel():
            self._copy_keys(layer, k, start)
        if bits == 16:
            return k.half()
        s = self.ksink.shape[2] if self.ksink.numel() else 0
        if start == 0 and s:
            # the sink's outlier keys would widen every channel's range for the whole first
            # group: store them in fp16 and quantize token s in their place (codes never read)
            self.ksink[layer] = k[:, :s].half()
            k = torch.cat([k[:, s : s + 1].expand(-1, s, -1), k[:, s:]], dim=1)
        grouped = k.reshape(self.H, c // g, g, self.D)  # H, C/G, G, D
        codes, scale, lo = kvquant.quantize(grouped, bits, dim=2)  # scale: H, C/G, 1, D
        self.ks[layer, :, start // g : (start + c) // g] = scale[:, :, 0]
        self.km[layer, :, start // g : (start + c) // g] = lo[:, :, 0]
        return kvquant.pack(codes.reshape(self.H, c, self.D), bits)

    def _copy_keys(self, layer: int, k: torch.Tensor, start: int) -> None:
        """The 4-bit copy of keys [H, C, D] at `start` (whole K groups), channel by channel
        (`kcopy` [H, D, T/2]: each group's codes packed planar along its tokens, kvquant.pack),
        with each group's per-channel scale, minimum and mean; the sink's outlier keys are left
        out of the first group's ranges (its pages are always read, never scored)."""
        g, c, s = self.cfg.k_group, k.shape[1], self.cfg.sink
        if start == 0 and s:
            k = torch.cat([k[:, s : s + 1].expand(-1, s, -1), k[:, s:]], dim=1)
        grouped = k.reshape(self.H, c // g, g, self.D).transpose(2, 3)  # H, C/G, D, G
        codes, scale, lo = kvquant.quantize(grouped, COPY_BITS, dim=3)  # scale: H, C/G, D, 1
        groups = slice(start // g, (start + c) // g)
        self.kcs[layer, :, groups] = scale[..., 0]
        self.kcm[layer, :, groups] = lo[..., 0]
        self.kcmu[layer, :, groups] = kvquant.dequantize(codes, scale, lo).mean(dim=3).half()
        packed = kvquant.pack(codes, COPY_BITS).permute(0, 2, 1, 3)  # H, D, C/G, G/2
        self.kcopy[layer, :, :, start // 2 : (start + c) // 2] = packed.reshape(self.H, self.D, -1)

    def key_copy(self, layer: int, n: int) -> torch.Tensor:
        """The 4-bit copy of the keys of tokens [0, n) (n a K group boundary), fp32 [H, n, D]."""
        g = self.cfg.k_group
        packed = self.kcopy[layer, :, :, : n // 2].unflatten(2, (n // g, g // 2))  # H, D, n/G, G/2
        codes = kvquant.unpack(packed, COPY_BITS).permute(0, 2, 3, 1)  # H, n/G, G, D
        scale, lo = (t[layer, :, : n // g, None] for t in (self.kcs, self.kcm))  # H, n/G, 1, D
        return kvquant.dequantize(codes, scale, lo).reshape(self.H, n, self.D)

    def _quantize_v(self, layer: int, v: torch.Tensor, start: int):
        """The codes of V [H, C, D] and their scales and minimums [H, C, D/v_group] (None, None
        at 16 bits)."""
        bits, gv, c = self.cfg.v_bits, self.cfg.v_group, v.shape[1]
        if self.vcent.numel():
            means = v.reshape(self.H, c // PAGE, PAGE, self.D).mean(dim=2)
            self.vcent[layer, :, start // PAGE : (start + c) // PAGE] = pack_means(means)
        if bits == 16:
            return v.half(), None, None
        if start == 0 and self.vsink.numel():
            self.vsink[layer] = v[:, : self.vsink.shape[2]].half()
        if self.v_rot.numel():
            v = v @ self.v_rot  # H, C, D
        grouped = v.reshape(self.H, c, self.D // gv, gv)  # H, C, D/gv, gv
        if self.cfg.v_sym:
            codes, scale = kvquant.quantize_sym(grouped, bits, dim=3, clip=self.cfg.v_clip)
            lo = None
        else:
            codes, scale, lo = kvquant.quantize(grouped, bits, dim=3, clip=self.cfg.v_clip)
            lo = lo[..., 0].half()
        # scale: H, C, D/gv, 1
        packed = kvquant.pack(codes.reshape(self.H, c, self.D), bits)
        return packed, scale[..., 0].half(), lo

    # -- reading ----------------------------------------------------------------------------
    def dequant_kv(self, layer: int, tok: int | torch.Tensor):
        """(keys, values) of `tok` (see `dequant_k`), the pages read once."""
        rows = self._stored(layer, tok)
        return self.dequant_k(layer, tok, rows), self.dequant_v(layer, tok, rows)

    def dequant_k(self, layer: int, tok: int | torch.Tensor, rows=None) -> torch.Tensor:
        """Quantized keys as fp32: of tokens [0, tok) ([H, tok, D]; tok a K group boundary), or
        of the token numbers `tok` [H, M] of each head ([H, M, D]). `rows`: `_stored`'s."""
        bits, g = self.cfg.k_bits, self.cfg.k_group
        kc = (rows or self._stored(layer, tok))[0]
        if bits == 16:
            return _take(kc, tok).float()
        codes = kvquant.unpack(_take(kc, tok), bits)  # H, M, D
        scale = _per_token(self.ks[layer], tok, g)  # H, M, D
        lo = _per_token(self.km[layer], tok, g)
        return _with_sink(kvquant.dequantize(codes, scale, lo), self.ksink, layer, tok)

    def dequant_v(self, layer: int, tok: int | torch.Tensor, rows=None) -> torch.Tensor:
        bits, gv = self.cfg.v_bits, self.cfg.v_group
        _, vc, vs, vm = rows or self._stored(layer, tok)
        if bits == 16:
            return _take(vc, tok).float()
        codes = kvquant.unpack(_take(vc, tok), bits)  # H, M, D
        scale = _take(vs, tok).repeat_interleave(gv, dim=2)  # H, M, D
        if self.cfg.v_sym:
            v = kvquant.dequantize_sym(codes, scale, bits)
        else:
            v = kvquant.dequantize(codes, scale, _take(vm, tok).repeat_interleave(gv, dim=2))
        if self.v_rot.numel():
            v = v @ self.v_rot.T
        return _with_sink(v, self.vsink, layer, tok)

    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        """kc, ks, km, vc, vs, vm, kbuf, vbuf, ksink, vsink, kcent, kspread, vcent of one layer
        (scales and sinks are empty at 16 bits, page summaries but with "meanstd" or "minmax",
        vcent without estimate_rest, codes with pages on disk), the V rotation (empty when V is
        not rotated), the page pool and this layer's page table (empty with pages in RAM), then
        the keys' copy: codes, group scales, minimums, means (empty but with "keys")."""
        pool = (self.pages.pool, self.pages.table[layer]) if self.pages else (_EMPTY, _EMPTY)
        mine = [t[layer] if t.numel() else t for t in self._parts()]
        return mine[:13] + [self.v_rot, *pool] + mine[13:]

    def ensure(self, layer: int, pages: torch.Tensor | None) -> None:
        """Before attending: `pages` [H, P] of `layer` (None: all of them) resident."""
        if self.pages is None:
            return
        if pages is None:
            q = self.qend(self._n_next)
            pages = torch.arange(q // PAGE, dtype=torch.int32).repeat(self.H, 1)
        self.pages.ensure(layer, pages.contiguous())

    def page_summaries(self, layer: int, pages: int) -> tuple[torch.Tensor, ...]:
        """Per-page, per-channel key centre and spread (fp16; empty but with "meanstd" or
        "minmax"), and value mean (fp32, as the 4-bit codes give it back; empty without
        estimate_rest), of the first `pages`: [H, pages, D] each."""
        cent, spread, vcent = (t[layer, :, :pages] if t.numel() else t for t in self._summaries[:3])
        return cent, spread, unpack_means(vcent) if vcent.numel() else vcent

    def resummarize(self, cfg: KVConfig) -> None:
        """Take `cfg`'s page summary, score and estimate from here on, the summaries of the
        pages stored computed again from their keys (an fp16 cache: measuring one prefill under
        several selections)."""
        assert self.cfg.k_bits == 16 and self.pages is None, "summaries come from fp16 pages"
        assert (cfg.k_bits, cfg.v_bits) == (self.cfg.k_bits, self.cfg.v_bits)
        fresh = KVCache(cfg, self.L, self.H, self.D, self.T)  # empty: the OS maps it lazily
        self.cfg = cfg
        (self.kcent, self.kspread, self.vcent, self.kcopy, self.kcs, self.kcm,
         self.kcmu) = fresh._summaries  # fmt: skip
        q = self.qend(self.n)
        for layer in range(self.L):
            if cfg.page_summary:
                self._quantize_k(layer, self.kc[layer, :, :q].float(), 0)
            if self.vcent.numel():
                pages = self.vc[layer, :, :q].float().reshape(self.H, q // PAGE, PAGE, self.D)
                self.vcent[layer, :, : q // PAGE] = pack_means(pages.mean(dim=2))


_EMPTY = torch.empty(0, dtype=torch.int32)


def _take(t: torch.Tensor, tok: int | torch.Tensor) -> torch.Tensor:
    """t: [H, T, X] → rows [0, tok) ([H, tok, X]), or each head's rows `tok` [H, M] ([H, M, X])."""
    if isinstance(tok, int):
        return t[:, :tok]
    return t.gather(1, tok[:, :, None].expand(-1, -1, t.shape[2]))


def _per_token(scales: torch.Tensor, tok: int | torch.Tensor, g: int) -> torch.Tensor:
    """Per-group rows [H, T/g, X] → one row per token of `tok` (see `_take`), [H, M, X]."""
    if isinstance(tok, int):
        return scales[:, : tok // g].repeat_interleave(g, dim=1)
    return _take(scales, tok // g)


def _with_sink(x: torch.Tensor, sink: torch.Tensor, layer: int, tok) -> torch.Tensor:
    """x: [H, M, D] dequantized tokens `tok` (see `_take`); sink tokens replaced by their fp16."""
    if not sink.numel():
        return x
    s = sink.shape[2]
    if isinstance(tok, int):
        s = min(s, tok)
        x[:, :s] = sink[layer, :, :s].float()
        return x
    exact = _take(sink[layer], tok.clamp(max=s - 1)).float()
    return torch.where((tok < s)[:, :, None], exact, x)


def page_summary(pages: torch.Tensor, cfg: KVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """pages: [H, P, 16, D] keys → per-page, per-channel (centre, spread) [H, P, D] fp16."""
    if cfg.page_summary == "minmax":
        lo, hi = pages.amin(dim=2), pages.amax(dim=2)
        return ((lo + hi) / 2).half(), ((hi - lo) / 2).half()
    return pages.mean(dim=2).half(), pages.std(dim=2, correction=0).half()


def vcent_bytes(d: int) -> int:
    """Bytes of one page's value mean: d 4-bit codes, an fp16 scale and minimum."""
    return d * VCENT_BITS // 8 + 4


def pack_means(x: torch.Tensor) -> torch.Tensor:
    """Rows [..., D] → [..., vcent_bytes(D)] uint8: 4-bit codes (one scale, min per row)."""
    codes, scale, lo = kvquant.quantize(x, VCENT_BITS, dim=-1)
    tail = torch.cat([scale, lo], dim=-1).view(torch.uint8)  # ..., 4
    return torch.cat([kvquant.pack(codes, VCENT_BITS), tail], dim=-1)


def unpack_means(b: torch.Tensor) -> torch.Tensor:
    """`pack_means`'s bytes → rows [..., D] fp32."""
    tail = b[..., -4:].contiguous().view(torch.float16).float()  # ..., 2
    codes = kvquant.unpack(b[..., :-4], VCENT_BITS)
    return kvquant.dequantize(codes, tail[..., :1], tail[..., 1:])


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal n×n Hadamard matrix (Sylvester's construction, symmetric), n a power of 2.

    A rotated V row spreads each channel's outliers over all n, so one scale per token fits
    every channel; attention undoes it once on the summed output, since it is linear."""
    assert n & (n - 1) == 0, f"V rotation needs a power-of-2 head dim, not {n}"
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5
