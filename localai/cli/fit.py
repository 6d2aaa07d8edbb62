"""`localai fit MODEL`: will it run here, with what resident and what expert cache, and how fast,
from the GGUF header and two rates measured once on this machine (engine/torch/fit.py)."""

from __future__ import annotations

import json

import click

from .app import main, settings_of, user_errors


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@main.command()
@click.argument("model")
@click.option("--budget", help="RAM for experts (bytes such as 4G, or a share such as 40%); "
              "default: what the RAM budget leaves after resident weights and KV.")  # fmt: skip
@click.option("--ctx", "context_length", type=int, help="Context length for the KV estimate.")
@click.option("--threads", type=int, help="CPU threads (default: physical cores).")
@click.option("--reprobe", is_flag=True, help="Measure the disk and kernel rates again.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
@user_errors
def fit(ctx, model, budget, context_length, threads, reprobe, as_json):
    """Whether MODEL (a catalog name or a .gguf path) runs in the RAM budget with the torch
    runner, what stays resident, the expert cache, and a decode tokens/s band. Nothing is
    loaded: the header says the sizes, and a one-time probe (cached) says the rates."""
    from ..catalog import resolve_model
    from ..engine.torch.experts import parse_budget
    from ..engine.torch.fit import forecast, probe, read_shape
    from ..governor import Governor
    from ..runtime import open_catalog

    settings = settings_of(ctx, context_length=context_length, threads=threads)
    path = resolve_model(open_catalog(settings), model, pull=False)
    shape = read_shape(path)
    if budget:
        try:
            parse_budget(budget, shape.expert_bytes or 1)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--budget") from None
    if not as_json:
        click.echo("measuring this machine's disk and kernel rates (once) …", err=True)
    rates = probe(settings.home, path, settings.threads, refresh=reprobe)
    ram = Governor(settings.ram_budget_bytes).budget
    ctx_len = settings.context_length
    out = {"model": model, "path": str(path), "context_length": ctx_len,
           **forecast(shape, rates, ram, ctx_len, budget)}  # fmt: skip
    if as_json:
        click.echo(json.dumps(out))
        return
    verdict = "runs" if out["runs"] else "does not fit"
    click.echo(f"{model}: {verdict} in a RAM budget of {gib(ram)} ({out['arch']}, "
               f"{gib(out['file_bytes'])} file, {ctx_len:,}-token context)")  # fmt: skip
    click.echo(f"  resident: {gib(out['resident_bytes'])} weights and runtime, "
               f"{gib(out['kv_bytes'])} KV")  # fmt: skip
    if out["expert_bytes"]:
        click.echo(f"  experts: {gib(out['expert_bytes'])}, cache {gib(out['expert_cache_bytes'])}"
                   f" (hit rate ≥ {out['hit_rate_uniform']:.0%} if routing were uniform; "
                   f"{out['read_bytes_per_token'] / 2**20:.0f} MiB read per token)")  # fmt: skip
    click.echo(f"  decode: {out['tokens_per_s_low']:.2f}-{out['tokens_per_s_high']:.2f} tokens/s "
               f"(disk {out['disk_bytes_per_s'] / 1e9:.2f} GB/s, kernels "
               f"{out['matvec_bytes_per_s'] / 1e9:.2f} GB/s)")  # fmt: skip
