"""Mixture-of-experts architectures in the torch runner, against llama.cpp on the same tiny GGUFs
(moe_gguf.py: random weights in Q4_K/Q6_K/Q8_0/F16/F32, the test model's tokenizer)."""

from pathlib import Path
from pydoc_data.topics import topics

import llama_cpp
import numpy as np
import pytest
import torch
from moe_gguf import ARCHS, build

from localai.engine import Done, Message, SamplingParams, chat
from localai.engine.torch import TorchEngine

N = 512
TEXT = "\n\n".join(topics[k] for k in sorted(topics))[:20000]


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory, model_path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe")
    return {a: build(d / f"{a}.gguf", a, model_path) for a in ARCHS}


def llama_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N, n_batch=N, logits_all=True,
                          n_threads=1, verbose=False)  # fmt: skip
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    finally:
        llm.close()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_moe_logits_match_llama_cpp(arch, moe_files):
    """Perplexity within 1% of llama.cpp's and top-1 agreement at the dense tests' level (95%),
    over 511 positions; one-token steps pick the same tokens as the prompt pass.

    Measured: perplexity ratio 0.998-1.000, top-1 agreement 96.1% (llama: Mixtral-style, the
    smallest top-2 margins) to 98.0% (olmoe), mean |logit difference| ~0.02."""
    eng = TorchEngine(moe_files[arch], context_length=N, threads=1)
    try:
        assert eng.info()["arch"] == arch and eng.model.hp.is_moe
        tokens = eng.tokenize(TEXT, special=False)[:N]
        ref = llama_logits(moe_files[arch], tokens)[:-1]  # N-1, V
        model = eng.model
        model.cache.reset()
        ours = torch.cat([model.forward(torch.tensor(tokens[i : i + 128]), True)
                          for i in range(0, N, 128)])[:-1]  # fmt: skip
        tgt = torch.tensor(tokens[1:])[:, None]
        nll_ref = -float(torch.log_softmax(ref, -1).gather(1, tgt).mean())
        nll_ours = -float(torch.log_softmax(ours, -1).gather(1, tgt).mean())
        assert abs(np.exp(nll_ours - nll_ref) - 1) < 0.01, (nll_ours, nll_ref)
        agree = float((ref.argmax(-1) == ours.argmax(-1)).float().mean())
        assert agree >= 0.95, agree

        model.cache.reset()  # the same positions one token at a time
        model.forward(torch.tensor(tokens[:32]))
        steps = torch.cat([model.forward(torch.tensor(tokens[i : i + 1]), True)
                           for i in range(32, 64)])  # fmt: skip
        assert torch.equal(steps.argmax(-1), ours[32:64].argmax(-1))
        assert float((steps - ours[32:64]).abs().max()) < 0.5
    finally:
        eng.close()


def test_moe_chat_streams_through_the_engine(moe_files):
    """A MoE GGUF runs through the Engine protocol: greedy chat, the same tokens as llama.cpp's
    tokenizer, the experts counted in the weight bytes."""
    path = moe_files["qwen3moe"]
    eng = TorchEngine(path, context_length=N, threads=1)
    try:
        hp = eng.model.hp
        expert_bytes = sum(b.ffn.experts.nbytes for b in eng.model.blocks)
        assert hp.n_experts == 8 and hp.n_experts_used == 2
        assert eng.info()["weights_bytes"] > expert_bytes > 0
        params = SamplingParams(max_tokens=8, temperature=0.0)
        events = list(chat(eng, [Message("user", "Hello")], params))
        done = events[-1]
        assert isinstance(done, Done) and done.stats.completion_tokens == 8
        assert eng.info()["experts"] == 8 and eng.info()["experts_used"] == 2
    finally:
        eng.close()
