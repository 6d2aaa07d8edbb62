"""Screens of the TUI compared with stored SVG snapshots (pytest-textual-snapshot). After an
intended change of layout, refresh them with `pytest tests/test_tui_snapshots.py
--snapshot-update` and look at the new SVGs before committing them."""

from __future__ import annotations

import pytest
from localai_tui.app import LocalaiApp
from localai_tui.client import DaemonClient
from localai_tui.store import Store
from localai_tui.widgets import SourcesPane

pytestmark = pytest.mark.slow

CITES = [
    {"path": "docs/boiler.md", "start_line": 12, "end_line": 14, "verified": True,
     "quote": "The boiler pressure must stay below 2 bar."},
    {"path": "docs/old-notes.txt", "start_line": 3, "end_line": 3, "verified": False,
     "quote": "Pressure limit: 3 bar.", "reason": "the file changed since it was indexed"},
]  # fmt: skip


def app_for(daemon, tmp_path) -> LocalaiApp:
    return LocalaiApp(
        DaemonClient(daemon.url, daemon.token), Store(tmp_path / "c.db"), daemon.model
    )


def test_help_screen_at_80x24(snap_compare, daemon, tmp_path):
    assert snap_compare(app_for(daemon, tmp_path), press=["f1"], terminal_size=(80, 24))


def test_sources_pane_with_an_unverified_citation(snap_compare, daemon, tmp_path):
    async def show(pilot):
        pilot.app.query_one("#prompt").cursor_blink = False  # a blinking cursor is a coin toss
        pane = pilot.app.query_one(SourcesPane)
        pane.show(CITES)
        await pilot.pause(0.2)
        pane.query_one("#citations").highlighted = 1  # as a person moving down the list
        for _ in range(20):  # bounded wait for the passage, however busy the CPU
            await pilot.pause(0.1)
            if "Pressure limit" in pane.query_one("#passage").source:
                break
        await pilot.pause(0.2)

    app = app_for(daemon, tmp_path)
    assert snap_compare(app, run_before=show, terminal_size=(100, 30))
