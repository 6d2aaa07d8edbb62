"""Sentence embeddings with MiniLM-L6-v2: 384-d, unit length (mean-pool + L2 norm).

Two backends compute the same model; `backend` names the one in use (the index records it):
- "torch-bf16": the fp32 safetensors run in bf16 by bert.py; chosen when the weights are
  installed and the CPU multiplies bf16 in hardware (about 3x the ONNX path on the reference
  machine; vectors within cosine 0.9995 of it, see BENCHMARKS.md).
- "onnx-int8": the int8 ONNX export on onnxruntime, everywhere else.
- "torch-fp32": the same safetensors in fp32 with plain torch ops; the reference model (tests,
  bench), never picked by "auto".

Texts are sorted by length and batched so that padding (wasted work) stays small; vectors come
back in input order. The shipped tokenizer.json pads and truncates to 128 tokens; we truncate at
`max_tokens` (the model's 256 by default) and pad only to the longest text of a batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DIM = 384
BACKENDS = ("auto", "torch-bf16", "torch-fp32", "onnx-int8")
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
        self.backend = pick_backend(Path(model_path), backend)
        if self.backend.startswith("torch"):
            import torch

            from .bert import MiniLM

            bf16 = self.backend == "torch-bf16"
            self.model = MiniLM.load(Path(model_path).with_name(WEIGHTS), fused=bf16,
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

    def count_tokens(self, text: str) -> int:
        """Tokens the embedder sees for `text` (special tokens included, before truncation)."""
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, 384) float32, L2-normalised, in the order of `texts`."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        encs = self._truncating.encode_batch(texts)
        order = np.argsort([len(e.ids) for e in encs], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)  # B batch, T tokens
            mask = np.zeros_like(ids)
            for row, i in enumerate(idx):
                n = len(encs[i].ids)
                ids[row, :n] = encs[i].ids
                mask[row, :n] = 1
            pooled = self._pool(ids, mask)  # (B, 384)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[idx] = pooled
        return out

    def _pool(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T) ids and mask → (B, 384) float32 mean of the last hidden state over the mask."""
        if self.backend.startswith("torch"):
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            return self.model.encode(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]  # (B, T, 384)
        m = mask[..., None].astype(np.float32)
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def pick_backend(model_path: Path, backend: str = "auto") -> str:
    """The backend `auto` means here: torch-bf16 if its weights are installed and bf16 is native."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedder backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from .bert import bf16_is_native

    fast = model_path.with_name(WEIGHTS).is_file() and bf16_is_native()
    return "torch-bf16" if fast else "onnx-int8"
