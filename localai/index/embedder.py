"""Sentence embeddings with MiniLM-L6-v2 (int8 ONNX) on onnxruntime: 384-d, unit length.

Texts are sorted by length and batched so that padding (wasted work) stays small; vectors come
back in input order. The shipped tokenizer.json pads and truncates to 128 tokens; we truncate at
`max_tokens` (the model's 256 by default) and pad only to the longest text of a batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

DIM = 384


class Embedder:
    def __init__(self, model_path: Path, tokenizer_path: Path, threads: int = 2,
                 max_tokens: int = 256, batch_size: int = 32):  # fmt: skip
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._truncating = Tokenizer.from_file(str(tokenizer_path))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_tokens)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
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
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feeds)[0]  # (B, T, 384)
            m = mask[..., None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)  # (B, 384)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[idx] = pooled
        return out
