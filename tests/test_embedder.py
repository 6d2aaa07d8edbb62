import numpy as np


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
