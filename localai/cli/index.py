"""`localai index`, `localai sources` and `localai search`: the personal document index.

Each command opens the index in-process (no daemon needed), calls one Index method and prints:
rich text for people, one JSON object (or JSONL for `search --queries`) for scripts.
"""

from __future__ import annotations

import functools
import json
import signal
import threading
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..index import MODES, UNITS, IndexError_
from ..terminal import shown
from .app import err, find_daemon, log, main, settings_of, user_errors


def index_errors(fn):
    """The index's own request errors become `Error: …` messages like every user error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import pysqlite3.dbapi2 as sqlite3

        from ..index.facade import db_path

        try:
            return fn(*args, **kwargs)
        except IndexError_ as e:
            raise click.ClickException(str(e)) from e
        except sqlite3.DatabaseError as e:  # a damaged or foreign file where index.db should be
            ctx = click.get_current_context()
            where = db_path(settings_of(ctx))
            raise click.ClickException(
                f"the index at {where} cannot be used ({e}); your documents are untouched: move "
                "that file away and run `localai index PATH` to build a new index"
            ) from e
        except Exception as e:
            if not type(e).__module__.startswith("psycopg"):
                raise
            # the PostgreSQL server went away, or refused a query mid-command
            raise click.ClickException(
                f"the PostgreSQL index failed: {str(e).strip().splitlines()[0]}; nothing was "
                "half-written (each file is one transaction): check the server and run it again"
            ) from e

    return user_errors(wrapper)


def _open(ctx):
    from ..runtime import open_index  # the index is loaded only when an index command runs

    return open_index(settings_of(ctx))


def _run_with_progress(index, paths, show: bool):
    if not show:
        return index.update(paths)
    cols = [TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("files")]
    cols += [TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    t0 = time.perf_counter()
    with Progress(*cols, console=err, transient=True) as bars:
        task = bars.add_task("index", total=None, rate="")

        def progress(done: int, total: int, chunks: int) -> None:
            rate = chunks / max(time.perf_counter() - t0, 1e-6)
            bars.update(task, completed=done, total=total, rate=f"{rate:,.0f} chunks/s")

        return index.update(paths, progress=progress)


def _summary(st) -> None:
    ratio = st.index_bytes / st.text_bytes if st.text_bytes else 0.0
    log(f"{st.files:,} files, {st.chunks:,} chunks in the index; this run: {st.changed:,} "
        f"(re)indexed, {st.removed:,} removed, {st.embedded:,} chunks embedded, "
        f"{st.reused:,} reused, {st.seconds:.1f} s")  # fmt: skip
    log(f"text {st.text_bytes / 1e6:,.2f} MB, index {st.index_bytes / 1e6:,.2f} MB "
        f"({ratio:.0%} of the text)")  # fmt: skip
    if st.skipped:
        log(f"{len(st.skipped):,} skipped:")
        for s in st.skipped[:10]:
            err.print(f"  {shown(s['path'])}: {shown(s['reason'])}", markup=False, highlight=False)
        if len(st.skipped) > 10:
            err.print(f"  … and {len(st.skipped) - 10:,} more (--json lists all)")


@main.command("index")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the run's stats as one object.")
@click.option("--watch", is_flag=True, help="Keep watching the sources until Ctrl-C.")
@click.option("--check", is_flag=True, help="Verify the index's integrity and exit.")
@click.option("--upgrade", is_flag=True, help="Rebuild an older index's FTS in the smaller layout.")
@click.option(
    "--export",
    "export_to",
    metavar="URI",
    help="Copy this sqlite index into PostgreSQL (postgresql://…), no re-embedding.",
)
@click.pass_context
@index_errors
def index_cmd(ctx, paths, as_json, watch, check, upgrade, export_to):
    """Add PATHS as sources and index them; with no PATHS, re-index every source."""
    ix = _open(ctx)
    if export_to:
        _export(ix, export_to, as_json)
        return
    if check:
        found = ix.check()
        info = {"ok": not found, "problems": found, **ix.stats()}
        if as_json:
            click.echo(json.dumps(info))
        else:
            log("index is consistent" if not found else "index has problems:")
            for p in found:
                err.print(f"  {p}", highlight=False)
            if info["fts_layout"] != "tf":
                log(
                    "the index uses an older, larger FTS layout (about 0.32 of the text's "
                    "bytes instead of 0.19); `localai index --upgrade` rebuilds it from your files"
                )
        ctx.exit(0 if not found else 1)
    if upgrade:
        if paths:
            raise click.ClickException("--upgrade takes no PATHS; run it alone, then index them")
        _upgrade(ix, as_json)
        return
    for p in paths:
        ix.add_source(p)
    if not paths and not ix.sources():
        raise click.ClickException("no sources yet: run `localai index PATH` to add a folder")
    st = _run_with_progress(ix, list(paths) or None, show=err.is_terminal and not as_json)
    if as_json:
        click.echo(json.dumps(st.as_dict()))
    else:
        _summary(st)
    if watch:
        _watch(ix)


def _export(ix, uri: str, as_json: bool) -> None:
    from ..index.pg_store import shown_uri

    if not uri.startswith(("postgresql://", "postgres://")):
        raise click.ClickException(f"--export takes a postgresql:// URI, not {uri!r}")
    got = ix.export(uri)
    if as_json:
        click.echo(json.dumps(got))
        return
    log(f"exported {got['files']:,} files, {got['chunks']:,} chunks to {shown(shown_uri(uri))} "
        f"({got['skipped_same']:,} already there); nothing was re-embedded")  # fmt: skip
    log(f"search it with index_store = \"{shown(shown_uri(uri))}\" in config.toml "
        "(or LOCALAI_INDEX_STORE)")  # fmt: skip


def _upgrade(ix, as_json: bool) -> None:
    before = ix.stats()["index_bytes"]
    if ix.stats()["fts_layout"] == "tf" and not as_json:
        log("the index already uses the current FTS layout; nothing to do")
        return
    if not as_json:
        log("rebuilding the FTS index from your files (other indexing waits until it is done)")
    got = ix.upgrade_fts()
    after = ix.stats()["index_bytes"]
    if as_json:
        click.echo(json.dumps(got | {"index_bytes_before": before, "index_bytes": after}))
        return
    log(f"FTS rebuilt for {got['chunks']:,} chunks; index {before / 1e6:,.2f} MB → "
        f"{after / 1e6:,.2f} MB")  # fmt: skip
    if got["stale_files"]:
        log(f"{got['stale_files']:,} files changed since they were indexed; "
            "`localai index` re-indexes them")  # fmt: skip


def _watch(ix) -> None:
    stop = threading.Event()
    names = ", ".join(escape(shown(s["path"])) for s in ix.sources())
    log(f"watching {names} (Ctrl-C to stop)")

    def report(st) -> None:
        log(f"{st.changed} file(s) re-indexed, {st.removed} removed, "
            f"{st.embedded} chunks embedded ({st.seconds:.2f} s)")  # fmt: skip

    def failed(e: Exception, retry_in: float | None) -> None:
        from ..index.watcher import failure

        log(f"[yellow]{escape(shown(failure(e, retry_in)))}[/yellow]")

    # Ctrl-C and SIGTERM stop the loop. Handlers set here, not Python's default: a process
    # started in the background by a non-interactive shell inherits SIGINT ignored, and then
    # Ctrl-C (or a supervisor's SIGINT) would never reach the default handler.
    def interrupted(signum, frame) -> None:
        stop.set()

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ix.watch(stop, on_update=report, on_error=failed)
    except KeyboardInterrupt:
        stop.set()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log("stopped watching")


@main.group("sources", invoke_without_command=True)
@click.pass_context
def sources(ctx):
    """List the indexed sources (default) or remove one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(sources_list)


@sources.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@index_errors
def sources_list(ctx, as_json=False):
    """Every source with its file and chunk counts."""
    rows = _open(ctx).sources()
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        log("no sources yet: `localai index PATH` adds one")
    for r in rows:
        gone = "" if r["exists"] else "  (missing)"
        click.echo(f"{shown(r['path'])}  {r['files']:,} files  {r['chunks']:,} chunks{gone}")


@sources.command("rm")
@click.argument("path", type=click.Path(path_type=Path))
@click.pass_context
@index_errors
def sources_rm(ctx, path):
    """Forget a source and drop its files from the index (the files stay untouched)."""
    n = _open(ctx).remove_source(path)
    log(f"removed {escape(shown(str(path)))}: {n:,} files dropped from the index")


@main.command("search")
@click.argument("query", required=False)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Results to return.")
@click.option("--unit", type=click.Choice(UNITS), default="chunk", show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="hybrid", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print results as a JSON list.")
@click.option("--under", type=click.Path(path_type=Path), help="Only files in this folder.")
@click.option(
    "--queries",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run every query in FILE (lines, or JSONL with _id and text); JSONL out.",
)
@click.option("--no-daemon", is_flag=True, help="Search here even if a daemon runs.")
@click.pass_context
@index_errors
def search_cmd(ctx, query, k, unit, mode, as_json, under, queries, no_daemon):
    """Find the passages (or files, --unit file) that best match QUERY. When `localai serve`
    runs for this home, its index answers (no embedder to start here)."""
    if (query is None) == (queries is None):
        raise click.ClickException("give either a QUERY or --queries FILE")
    rows = None if no_daemon or queries is not None else _daemon_search(ctx, query, k, unit,
                                                                          mode, under)  # fmt: skip
    ix = None
    if rows is None:
        from ..index.search import hit_row

        ix = _open(ctx)
        if queries is not None:
            _batch(ix, queries, k, unit, mode, under)
            return
        hits = ix.search(query, k=k, unit=unit, mode=mode, under=under)
        rows = [hit_row(h, p) for h, p in zip(hits, ix.read_many(hits), strict=True)]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        empty = ix is not None and not ix.stats()["chunks"]
        log("no matches" + (" (the index is empty)" if empty else ""))
    out = Console(highlight=False)
    for i, r in enumerate(rows, start=1):
        where = escape(shown(r["where"]))
        out.print(f"[bold]{i}. {where}[/bold]  [dim]score {r['score']:.4f}[/dim]")
        if not r["verified"]:
            out.print(f"   [yellow]{escape(shown(r['reason']))}[/yellow]")
        lines = [ln.strip() for ln in r["text"].splitlines() if ln.strip()]
        snippet = shown(" ".join(lines)[:300])  # a file's text may carry escape sequences too
        out.print(f"   {snippet}", markup=False)


def _daemon_search(ctx, query, k, unit, mode, under) -> list[dict] | None:
    """The running daemon's answer, or None to search in-process (no daemon of ours, or it
    has no index)."""
    from ..engine import EngineError

    d = find_daemon(settings_of(ctx), "searching here instead")
    if d is None:
        return None
    body = {"query": query, "k": k, "unit": unit, "mode": mode}
    try:
        if under is not None:  # the daemon runs elsewhere: it gets an absolute path
            body["under"] = str(under.expanduser().absolute())
        return d.search(body)
    except (EngineError, OSError, ValueError, RuntimeError):  # in-process says what is wrong
        return None


def _batch(ix, path: Path, k: int, unit: str, mode: str, under) -> None:
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        qid, text = str(n), line.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
                qid, text = str(obj["_id"]), obj["text"]
            except (ValueError, KeyError) as e:
                raise click.ClickException(f"{path}:{n}: not a query object ({e})") from e
        hits = ix.search(text, k=k, unit=unit, mode=mode, under=under)
        results = [{"path": h.path, "score": h.score, "chunk_id": h.chunk_id,
                    "start_line": h.start_line, "end_line": h.end_line} for h in hits]  # fmt: skip
        click.echo(json.dumps({"_id": qid, "results": results}))
