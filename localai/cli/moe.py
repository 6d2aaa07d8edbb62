"""`localai moe`: tools for mixture-of-experts models (routing traces and what they predict)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import EXPERT_POLICIES as POLICIES
from .app import main, user_errors


@main.group()
def moe() -> None:
    """Mixture-of-experts models: routing traces (`run --trace-routing FILE`) replayed."""


@moe.command("curve")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policy", "policies", multiple=True, type=click.Choice(POLICIES),
              help="Eviction policies to replay (default: all).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@user_errors
def moe_curve(trace: Path, policies: tuple[str, ...], as_json: bool) -> None:
    """The expert cache's hit rate at each size (a share of all experts), per eviction policy,
    had it served the recorded routing."""
    from ..engine.torch.routing import SHARES, curve

    try:
        out = curve(trace, SHARES, policies or POLICIES)
    except (ValueError, KeyError) as e:
        raise click.ClickException(f"{trace} is not a routing trace: {e}") from None
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{out['lookups']:,} expert lookups ({out['distinct']:,} distinct experts "
               f"of {out['total_experts']:,}) in {trace}")  # fmt: skip
    names = list(policies or POLICIES)
    click.echo("cache share  experts  " + "  ".join(f"{p:>6}" for p in names))
    for row in out["curve"]:
        rates = "  ".join(f"{row[p]:6.1%}" for p in names)
        click.echo(f"{row['share']:>11.0%}  {row['experts']:>7,}  {rates}")
