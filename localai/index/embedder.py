"""Sentence embeddings with MiniLM-L6-v2: 384-d, unit length (mean-pool + L2 norm).

The backends compute the same model into one vector space (an index embedded by one is searched
by another with recall@10 0.98, see BENCHMARKS.md); `backend` names the one in use:
- "torch-bf16": the fp32 safetensors run in bf16 by bert.py; chosen when the weights are
  installed and the CPU multiplies bf16 in hardware (several times the ONNX path's speed on
  AMX machines).
- "torch-fp32": the same weights in fp32, bias/GELU/residual fused into oneDNN's matmuls;
  chosen where bf16 is not native (AVX2 laptops): on a 2-core AVX2 CPU it ran 1.2x the int8
  ONNX path (int8 buys nothing there: both run near the CPU's fp32 peak) with exact vectors.
- "onnx-int8": the int8 ONNX export on onnxruntime, when the fp32 weights are not installed.
- "reference": the fp32 weights with plain torch ops: the reference model (tests, bench),
  never picked by "auto".

Texts are sorted by length and batched so that padding (wasted work) stays small; vectors come
back in input order. The shipped tokenizer.json pads and truncates to 128 tokens; we truncate at
`max_tokens` (the model's 256 by default) and pad only to the longest text of a batch.

The torch backends run one batch per worker thread, each on one core, instead of splitting every
op across cores: an op split across threads waits for all of them, and when the cores are busy
with other work each of the ~45 ops of a forward can wait a scheduler slice (measured at load 10
on 2 cores: a 12-token query took 400 ms on 2 threads, 6 ms on 1, and batches ran 1.7x faster
on 1 thread). Independent batches never wait for each other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DIM = 384
BACKENDS = ("auto", "torch-bf16", "torch-fp32", "onnx-int8", "reference")
WEIGHTS = "model.safetensors"  # fp32 weights, next to model.onnx when the catalog installed them


class Embedder:
    def __init__(self, model_path: Path, tokenizer_path: Path, threads: int = 2,
                 max_tokens: int = 256, batch_size: int = 32, backend: str = "auto"):  # fmt: skip
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._truncating = Tokenizer.from_file(str(tokenizer_path))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_tokens)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.threads = threads
        self.model_path, self.tokenizer_path = Path(model_path), Path(tokenizer_path)
        self._pool: ThreadPoolExecutor | None = None  # torch backends: one batch per thread
        self.backend = pick_backend(Path(model_path), backend)
        if self.backend != "onnx-int8":
            import torch

            from .bert import MiniLM, bf16_is_native

            if self.backend == "torch-bf16" and not bf16_is_native():
                raise ValueError(
                    "the torch-bf16 embedder needs a CPU that multiplies bf16 in hardware (AMX "
                    "or AVX512-BF16); this one has neither: use backend 'auto'"
                )

            bf16 = self.backend == "torch-bf16"
            self.model = MiniLM.load(Path(model_path).with_name(WEIGHTS),
                                     fused=self.backend != "reference",
                                     dtype=torch.bfloat16 if bf16 else torch.float32)  # fmt: skip
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(model_path), opts, providers=["CPUExecutionProvider"]
            )
            self._inputs = {i.name for i in self.session.get_inputs()}

    @property
    def on_torch(self) -> bool:
        """Whether a torch backend (one batch per worker thread) runs the model."""
        return self.backend != "onnx-int8"

    def count_tokens(self, text: str) -> int:
        """Tokens the embedder sees for `text` (special tokens included, before truncation)."""
        return len(self.tokenizer.encode(encodable(text), add_special_tokens=True).ids)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, 384) float32, L2-normalised, in the order of `texts`."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encs = self._truncating.encode_batch([encodable(t) for t in texts])
        order = np.argsort([len(e.ids) for e in encs], kind="stable")
        n = -(-len(order) // self.batch_size)  # batches of at most batch_size
        if self.on_torch:  # and at least one per worker: every core works
            n = max(n, min(self.threads, len(order)))
        batches = np.array_split(order, n)
        padded = [self._pad([encs[i].ids for i in idx]) for idx in batches]
        if self.on_torch:
            pooled = self._workers().map(self._pool_torch, padded)
        else:
            pooled = (self._pool_onnx(*p) for p in padded)
        for idx, p in zip(batches, pooled, strict=True):  # p: (B, 384)
            out[idx] = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        return out

    @staticmethod
    def _pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)  # B batch, T tokens
        mask = np.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return ids, mask

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="embed")
        return self._pool

    def _pool_torch(self, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """(B, T) ids and mask → (B, 384) float32 mean of the last hidden state over the mask."""
        import torch

        if torch.get_num_threads() != 1:  # per thread (OpenMP): other torch users keep theirs
            torch.set_num_threads(1)
        ids, mask = batch
        return self.model.encode(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def _pool_onnx(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]  # (B, T, 384)
        m = mask[..., None].astype(np.float32)
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def encodable(text: str) -> str:
    """`text` as a tokenizer accepts it: a lone surrogate becomes "?" instead of failing the whole
    batch. HTTP bodies are cleaned this way when read (server/params.read_json); here it covers
    text from elsewhere, e.g. a command-line query with undecodable bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def pick_backend(model_path: Path, backend: str = "auto") -> str:
    """The backend `auto` means here: the fp32 weights in bf16 where bf16 is native, in fp32
    elsewhere; the int8 ONNX model when the weights are not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedder backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if not model_path.with_name(WEIGHTS).is_file():
        return "onnx-int8"
    from .bert import bf16_is_native

    return "torch-bf16" if bf16_is_native() else "torch-fp32"
