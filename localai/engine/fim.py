"""Fill-in-the-middle prompts: code before and after the cursor → what goes between.

Each model family trains FIM with its own control tokens, in prefix-suffix-middle order. We find
the family by asking the tokenizer which markers are single control tokens, so any GGUF of a
known family works without a table of model names.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from .base import Engine, EngineError

# (prefix, suffix, middle) markers, most specific first.
FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder family
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
)
_found: WeakKeyDictionary = WeakKeyDictionary()


def _is_control(engine: Engine, marker: str, base: int) -> bool:
    return len(engine.tokenize(marker)) - base == 1


def fim_markers(engine: Engine) -> tuple[str, str, str] | None:
    """The model's FIM markers, or None if it was not trained for fill-in-the-middle."""
    if engine in _found:
        return _found[engine]
    base = len(engine.tokenize(""))  # BOS, if the model adds one
    found = next((fam for fam in FAMILIES if all(_is_control(engine, m, base) for m in fam)), None)
    _found[engine] = found  # a loaded tokenizer does not change
    return found


def fim_prompt(engine: Engine, prefix: str, suffix: str) -> str:
    markers = fim_markers(engine)
    if markers is None:
        raise EngineError(
            f"model {engine.name} has no fill-in-the-middle tokens, so `suffix` cannot be used; "
            "use a code model such as qwen2.5-coder-1.5b, or leave out the suffix"
        )
    pre, suf, mid = markers
    return f"{pre}{prefix}{suf}{suffix}{mid}"


def fim_stops(suffix: str) -> list[str]:
    """Stop strings for a fill: chat-tuned code models often write past the hole and repeat the
    code after the cursor, so the suffix's first non-blank line (at the start of a line) ends
    the middle. Short lines (`}`, `)`) are left out: they also occur inside the middle."""
    line = next((ln for ln in suffix.splitlines() if ln.strip()), "")
    return ["\n" + line] if len(line.strip()) >= 4 else []
