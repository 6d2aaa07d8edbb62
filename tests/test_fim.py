"""Fill-in-the-middle prompt layout, found from which markers the tokenizer knows as control
tokens. A fake engine implements the tokenize part of the Engine interface."""

import pytest

from localai.engine import EngineError
from localai.engine.fim import fim_prompt, fim_stops


class FakeTokenizer:
    """Splits text on spaces, except that each of `controls` is one token; optional BOS."""

    name = "fake"

    def __init__(self, controls: tuple[str, ...], bos: bool = False):
        self.controls, self.bos = controls, bos

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        ids = [1] if self.bos else []
        for c in self.controls:
            if text == c:
                return ids + [99]
        return ids + [ord(ch) for ch in text]


def test_qwen_markers_in_prefix_suffix_middle_order():
    eng = FakeTokenizer(("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), bos=True)
    assert (
        fim_prompt(eng, "def f(", "):\n") == "<|fim_prefix|>def f(<|fim_suffix|>):\n<|fim_middle|>"
    )


def test_starcoder_markers():
    eng = FakeTokenizer(("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    assert fim_prompt(eng, "a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"


def test_model_without_markers_is_refused():
    with pytest.raises(EngineError, match="fill-in-the-middle"):
        fim_prompt(FakeTokenizer(()), "a", "b")


def test_the_code_after_the_cursor_ends_the_fill():
    assert fim_stops("\n    return a\n") == ["\n    return a"]
    assert fim_stops("\n}\n") == []  # too short: a brace also closes blocks inside the middle
    assert fim_stops("") == []
