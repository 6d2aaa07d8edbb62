"""`localai perplexity FILE`: how well a model (and its KV cache settings) predicts a text."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..catalog import resolve_model
from ..engine import load_engine
from ..engine.perplexity import measure_llama, measure_torch
from ..runtime import open_catalog
from .app import engine_options, log, main, progress_bars, settings_of, user_errors


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@user_errors
def perplexity(ctx, file, model, engine, context_length, threads, type_k, type_v, as_json):
    """Perplexity of FILE's text, scored in windows of --ctx tokens (prints ppl, tokens,
    seconds). KV flags apply: --type-k/--type-v for llama, --kv-bits/--k-bits/--v-bits for
    torch."""
    s = settings_of(ctx, model=model, engine=engine, context_length=context_length,
                    threads=threads, type_k=type_k, type_v=type_v)  # fmt: skip
    text = file.read_text(encoding="utf-8", errors="replace")
    with progress_bars() as bars:
        path = resolve_model(open_catalog(s), s.model, log=log, progress=bars)
    if s.engine == "llama":
        result = measure_llama(path, text, s.context_length, s.threads, s.type_k, s.type_v)
    else:
        eng = load_engine("torch", path, s.model, s.context_length, s.threads,
                          k_bits=s.k_bits, v_bits=s.v_bits)  # fmt: skip
        try:
            result = measure_torch(eng, text)
        finally:
            eng.close()
    out = {"model": s.model, "engine": s.engine, "ctx": s.context_length} | result.as_dict()
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"ppl {out['ppl']:.4f} over {out['tokens']:,} tokens in {out['seconds']:.1f}s")
