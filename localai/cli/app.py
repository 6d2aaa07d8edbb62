"""The `localai` command group and what its commands share: error handling, progress bars,
settings, and the engine/sampling flags. Each command group lives in its own module beside this
one; every command stays thin: parse, call one function, print (rich for people, --json for
scripts). Errors a user can cause become one-line messages with exit status 1, not tracebacks."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import __version__
from ..catalog import CatalogError
from ..config import EXPERT_POLICIES, KV_BITS, KV_TYPES, ConfigError, load_settings
from ..engine import EngineError
from ..private import private_dir
from ..runtime import open_engine

err = Console(stderr=True)
USER_ERRORS = (CatalogError, ConfigError, EngineError, OSError)


def user_errors(fn):
    """Turn errors a user can cause into `Error: …` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e
        except KeyboardInterrupt:
            err.print("[dim]interrupted[/dim]")
            sys.exit(130)

    return wrapper


@contextmanager
def progress_bars():
    """A ProgressFactory drawing rich byte-progress bars on stderr."""
    cols = [TextColumn("{task.description}"), BarColumn(), DownloadColumn()]
    cols += [TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=False) as bars:

        def factory(desc: str, total: int):
            task = bars.add_task(desc, total=total)
            return lambda n: bars.advance(task, n)

        yield factory


def log(msg: str) -> None:
    err.print(f"[cyan]localai[/cyan] {msg}", highlight=False)


def find_daemon(settings, instead: str):
    """This home's running daemon, or None; when something else holds its port, says so and
    what the command does `instead` (it is never sent the token or the request)."""
    from ..daemon_client import Daemon, NotOurDaemon

    try:
        return Daemon.find(settings)
    except NotOurDaemon as e:
        err.print(f"[yellow]localai: {e}; {instead}[/yellow]", highlight=False)
        return None


def settings_of(ctx: click.Context, **overrides):
    kv = ctx.obj.get("kv_bits", {}) if ctx.obj else {}
    s = load_settings(ctx.obj["home"], **(kv | overrides))
    private_dir(s.home)  # what localai keeps there is this user's only (see private.py)
    return s


def _kv_bits_flag(key: str):
    """--k-bits / --v-bits / --kv-bits land in ctx.obj (not in each command's arguments), so
    every command with engine flags gets them without a signature change."""

    def store(ctx: click.Context, param, value):
        if value is not None:
            bits = ctx.obj.setdefault("kv_bits", {})
            for k in ("k_bits", "v_bits") if key == "kv" else (f"{key}_bits",):
                if key == "kv" and k in bits:
                    continue  # an explicit --k-bits / --v-bits wins over --kv-bits
                bits[k] = value
        return value

    return store


def _setting_flag(name: str):
    """A flag that lands in ctx.obj like the KV bits: every command with engine flags has it."""

    def store(ctx: click.Context, param, value):
        if value is not None:
            ctx.obj.setdefault("kv_bits", {})[name] = value
        return value

    return store


def _setting_option(flag: str, name: str, help: str, **kw):
    """An engine flag for setting `name`, landing in ctx.obj (see `_setting_flag`)."""
    return click.option(flag, expose_value=False, callback=_setting_flag(name), help=help, **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="localai")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: $LOCALAI_HOME or the XDG data dir).",
)
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """localai: a local assistant runtime. Models, documents and answers stay on this machine."""
    ctx.obj = {"home": home}


def engine_options(fn):
    """Flags that pick and configure the engine; they override config.toml and LOCALAI_*."""
    opts = [
        click.option("-m", "--model", help="Catalog name or path to a .gguf file."),
        click.option(
            "--engine",
            type=click.Choice(["llama", "torch", "remote"]),
            help="Backend; remote: an OpenAI-compatible server at --remote-url.",
        ),
        _setting_option(
            "--remote-url",
            "remote_url",
            "--engine remote: the server, e.g. http://gpu-box:8765 (its key: "
            "remote_api_key in config.toml or $LOCALAI_REMOTE_API_KEY).",
            metavar="URL",
        ),
        click.option("--ctx", "context_length", type=int, help="Context length in tokens."),
        click.option("--threads", type=int, help="CPU threads (default: physical cores)."),
        click.option("--type-k", type=click.Choice(KV_TYPES), help="KV cache type for K."),
        click.option("--type-v", type=click.Choice(KV_TYPES), help="KV cache type for V."),
        *(
            click.option(
                f"--{key}-bits",
                type=click.Choice([str(b) for b in KV_BITS]),
                expose_value=False,
                callback=_kv_bits_flag(key),
                help=f"Torch runner: {what} cache bits (16 = fp16).",
            )
            for key, what in (("k", "K"), ("v", "V"), ("kv", "K and V"))
        ),  # fmt: skip
        _setting_option(
            "--expert-budget",
            "expert_budget",
            "Torch runner, MoE models: RAM for experts read from disk on demand "
            "(bytes such as 4G, or a share of the expert bytes such as 40%; default: all in "
            "place if they fit in what the RAM budget leaves, else that).",
        ),
        _setting_option(
            "--attn-budget",
            "attn_budget",
            "Torch runner: tokens a decode step attends to at most (4096, 4K, or a share "
            "of --ctx such as 10%): the sink, the best-scoring KV pages and the recent window.",
            metavar="TOKENS|PCT",
        ),
        _setting_option(
            "--sparse-prefill/--dense-prefill",
            "sparse_prefill",
            "Torch runner, with --attn-budget: read a long prompt within the budget too, "
            "or densely (default; see BENCHMARKS.md).",
            default=None,
        ),
        _setting_option(
            "--kv-budget",
            "kv_budget",
            "Torch runner, with --attn-budget: RAM for the KV cache (bytes such as 64M, or a "
            "share such as 25%); its pages beyond it wait on disk until a step selects them "
            "(default: all in RAM if it fits in what the RAM budget leaves, else that).",
            metavar="BYTES|PCT",
        ),
        _setting_option(
            "--expert-prefetch/--no-expert-prefetch",
            "expert_prefetch",
            "Torch runner, MoE models with a budget: read each layer's likely experts "
            "while the layer before computes (default: off; see BENCHMARKS.md).",
            default=None,
        ),
        _setting_option(
            "--expert-policy",
            "expert_policy",
            "Torch runner, MoE models with a budget: which expert leaves it for another "
            "(default freq: the most asked-for stay; see BENCHMARKS.md).",
            type=click.Choice(EXPERT_POLICIES),
        ),
        _setting_option(
            "--trace-routing",
            "trace_routing",
            "Torch runner, MoE models: record each layer's experts to FILE (JSON lines; "
            "`localai moe curve FILE` replays it).",
            metavar="FILE",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def sampling_options(fn):
    opts = [
        click.option("-s", "--system", help="System prompt."),
        click.option("-t", "--temperature", type=float, default=0.7, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--seed", type=int, help="Random seed (same seed, same output)."),
        click.option("--max-tokens", type=int, default=512, show_default=True),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def engine_from_flags(ctx, model, engine, context_length, threads, type_k, type_v):
    s = settings_of(
        ctx,
        model=model,
        engine=engine,
        context_length=context_length,
        threads=threads,
        type_k=type_k,
        type_v=type_v,
    )
    with progress_bars() as bars:
        return open_engine(s, progress=bars, log=log)
