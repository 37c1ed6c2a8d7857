"""Review: rich markup in label text from a metrics endpoint must not break the `top` screen."""

from __future__ import annotations

import io

from rich.console import Console

from doqproxy.top import view
from tests.test_review2_top import snapshot


def test_live_screen_survives_markup_in_labels() -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(view.screen(snapshot(), None, 1.0))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "[/]" in out
    assert "\x1b" not in out
