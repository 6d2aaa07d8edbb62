import numpy as np
import pytest


def test_embeddings_are_unit_vectors_in_input_order(embedder):
    texts = [
        "The cat sat on the mat.",
        "Quarterly tax filing deadlines.",
        "A feline rested on a rug.",
    ]
    v = embedder.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 2] > sim[0, 1] + 0.3  # paraphrases are close, unrelated text is not
    # batching by length must not change a text's vector
    alone = embedder.embed([texts[2]])[0]
    assert np.allclose(alone, v[2], atol=1e-4)


def test_long_text_is_truncated_not_an_error(embedder):
    assert embedder.count_tokens("word " * 1000) > 256
    assert embedder.embed(["word " * 1000]).shape == (1, 384)
    assert embedder.embed([]).shape == (0, 384)


def test_backends_agree_with_the_fp32_reference(embedder):
    """bf16 and fp32 torch (fused oneDNN ops) and int8 ONNX embed within a tight cosine of the
    fp32 model with plain torch ops;
    the bar (0.999) is what keeps an index built by one backend searchable by the other."""
    from localai.index.bert import bf16_is_native
    from localai.index.embedder import Embedder

    assert embedder.backend == ("torch-bf16" if bf16_is_native() else "torch-fp32")
    model = embedder.model_path
    texts = [
        "The cat sat on the mat.",
        "File your income tax return before the April deadline to avoid late penalties. " * 6,
        "Astronomers measure the distance to nearby stars with parallax over a year.",
        "Rosin the violin bow before practice so the strings speak clearly. " * 20,  # truncated
    ]
    ref = Embedder(model, embedder.tokenizer_path, backend="reference").embed(texts)
    backends = ["onnx-int8", "torch-fp32"] + (["torch-bf16"] if bf16_is_native() else [])
    for backend in backends:
        v = Embedder(model, embedder.tokenizer_path, backend=backend, batch_size=3).embed(texts)
        cos = (v * ref).sum(axis=1)
        assert cos.min() > 0.999, (backend, cos)
    if not bf16_is_native():  # asked for where it cannot run: a clear error, not oneDNN's
        with pytest.raises(ValueError, match="bf16 in hardware"):
            Embedder(model, embedder.tokenizer_path, backend="torch-bf16")


def test_row_by_row_attention_matches_masked_attention():
    import torch
    import torch.nn.functional as F

    from localai.index.bert import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 12, 9, 32) for _ in range(3))  # (B, H, T, D)
    lens = [9, 4, 7]
    keep = (torch.arange(9)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    out = attention(q, k, v, lens)
    for i, n in enumerate(lens):
        assert torch.allclose(out[i, :, :n], ref[i, :, :n], atol=1e-5)
        assert not out[i, :, n:].any()  # padding is never computed
    assert torch.equal(attention(q, k, v, [9, 9, 9]), F.scaled_dot_product_attention(q, k, v))
