"""The live screen of ``doqproxy top``, drawn with ``rich`` (the ``doqproxy[top]`` extra)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from doqproxy.top import text
from doqproxy.top.keys import Keys
from doqproxy.top.model import Monitor, Snapshot
from doqproxy.top.scrape import Scrape, ScrapeError

_STATE_STYLES = {"up": "green", "backoff": "red", "probing": "yellow", "fallback": "magenta"}
_LEFT = {"upstream", "state", "last error"}
_SHRINK = {"upstream": 24, "last error": 12}
"""Columns that may be cut short, down to this many characters."""


def screen(snap: Snapshot, status: str | None, interval: float) -> RenderableType:
    """One frame: the summary lines, the upstream table and a status line."""
    summary = Text()
    summary.append(text.header(snap) + "\n", style="bold")
    summary.append(text.queries_line(snap) + "\n")
    summary.append("last 60s  ")
    summary.append(text.sparkline(snap.history) or "-", style="cyan")
    summary.append("\n" + text.cache_line(snap) + "\n")
    summary.append(
        text.servfail_line(snap) + "\n",
        style="red" if snap.servfail_rate else None,
    )
    summary.append(text.load_line(snap))
    rows = [text.upstream_cells(row) for row in snap.upstreams]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for index, column in enumerate(text.UPSTREAM_COLUMNS):
        widest = max([len(column), *(len(cells[index]) for cells in rows)])
        # On a narrow terminal the name and the error give way; the figures never do.
        shrink = _SHRINK.get(column)
        table.add_column(
            column,
            justify="left" if column in _LEFT else "right",
            no_wrap=True,
            min_width=widest if shrink is None else min(widest, shrink),
        )
    for row, cells in zip(snap.upstreams, rows, strict=True):
        state = Text(cells[1], style=_STATE_STYLES.get(row.state or "", ""))
        # Text, not str: a label's "[...]" is the endpoint's text, never rich markup.
        table.add_row(Text(cells[0]), state, *(Text(cell) for cell in cells[2:]))
    if status is not None:
        footer = Text(status, style="bold red")
    else:
        footer = Text(f"every {interval:g}s · q quits", style="dim")
    parts: list[RenderableType] = [summary, Text(""), table]
    if not snap.upstreams:
        parts.append(Text("(no upstream metrics yet)", style="dim"))
    parts += [Text(""), footer]
    return Group(*parts)


def run(monitor: Monitor, take: Callable[[], Scrape], first: Snapshot, interval: float) -> None:
    """Redraw every ``interval`` seconds until ``q`` (Ctrl-C raises KeyboardInterrupt).

    A failed scrape keeps the last figures on screen under "disconnected, retrying".
    """
    console = Console()
    snap, status = first, None
    with (
        Keys() as keys,
        Live(
            screen(snap, status, interval),
            console=console,
            screen=True,
            auto_refresh=False,
            redirect_stderr=False,
        ) as live,
    ):
        deadline = time.monotonic()
        while True:
            deadline = max(deadline + interval, time.monotonic())
            if keys.wait_for_quit(deadline - time.monotonic()):
                return
            try:
                snap, status = monitor.update(take()), None
            except ScrapeError as exc:
                status = f"disconnected, retrying: {exc}"
            live.update(screen(snap, status, interval), refresh=True)
