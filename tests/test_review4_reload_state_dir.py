"""Review of the restart-only settings on SIGHUP: a state directory left to its
default is the one the process started with, also after ``--user`` gave up root.

The default depends on the effective user (/var/lib/doqproxy for root, XDG state for
others). A reload re-reads the options after the switch, so it computed the other
user's default and said ``--state-dir cannot change without a restart`` on every
SIGHUP, though nobody changed it. Shown in process with the effective user faked:
a real run would create /var/lib/doqproxy on this shared machine.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from doqproxy.cli.config import parse
from doqproxy.cli.forward import forward


@pytest.fixture
def sighup_kept() -> Iterator[None]:
    """``forward`` holds SIGHUP from its first step: put the handler back after."""
    handler = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, handler)


def test_the_default_state_dir_does_not_move_after_the_user_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sighup_kept: None
) -> None:
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["-l", "127.0.0.1:5353", "-u", "quic://127.0.0.1:853", "--user", "nobody"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    started, _ = parse(forward, args)
    monkeypatch.setattr(os, "geteuid", lambda: 65534)  # after drop_privileges
    reloaded, _ = parse(forward, args)
    assert reloaded.state_dir == started.state_dir == Path("/var/lib/doqproxy")
