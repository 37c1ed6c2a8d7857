"""``doqproxy top``'s live view in a real terminal (tmux): what it shows while queries flow,
``q``, Ctrl-C and SIGTERM leaving the terminal as it was, and a forwarder that goes away."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from doqproxy.upstream import engine

from .conftest import ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .test_top_e2e import EVENT_LOOP, wait_for_metrics

StartProxy = Callable[..., ProxyProcess]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]

PROMPT = "READY> "


class Tmux:
    """One tmux server on its own socket, with one 160x50 pane running a plain bash."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"doqproxy-top-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self) -> None:
        shell = f"env PS1='{PROMPT}' TERM=xterm-256color bash --norc --noprofile -i"
        self.run("new-session", "-d", "-x", "160", "-y", "50", "-s", "top", shell)

    def type(self, line: str) -> None:
        self.run("send-keys", "-t", "top", "-l", line)
        self.run("send-keys", "-t", "top", "Enter")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-J", "-t", "top")

    async def wait_for(self, found: Callable[[str], bool], what: str, seconds: float = 40) -> str:
        screen = ""
        for _ in range(int(seconds / 0.2)):
            screen = self.screen()
            if found(screen):
                return screen
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {what} on the screen after {seconds}s:\n{screen}")

    def shell_child(self) -> int:
        """The process the pane's shell is running now."""
        shell = int(self.run("display-message", "-p", "-t", "top", "#{pane_pid}").strip())
        children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    terminal = Tmux(tmp_path)
    try:
        terminal.start()
        yield terminal
    finally:
        terminal.kill()


def top_command(metrics: int, tmp_path: Path) -> str:
    """Save the terminal settings, run top, say how it ended, save them again."""
    before, after = tmp_path / "stty-before", tmp_path / "stty-after"
    return (
        f"stty -a > {before}; {sys.executable} -m doqproxy top --metrics 127.0.0.1:{metrics}; "
        f'echo "top-exited rc=$?"; stty -a > {after}'
    )


def settings_unchanged(tmp_path: Path) -> None:
    before = (tmp_path / "stty-before").read_text()
    assert (tmp_path / "stty-after").read_text() == before
    assert re.search(r"(?<!-)icanon", before) and re.search(r"(?<!-)echo ", before)


async def query_loop(proxy: ProxyProcess) -> None:
    index = 0
    while True:
        query = dns.message.make_query(f"n{index % 64}.test.", "A")
        await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
        index += 1
        await asyncio.sleep(0.01)


def rate_now(screen: str) -> float | None:
    match = re.search(r"queries\s+([0-9.]+)(k?)/s now", screen)
    if match is None:
        return None
    return float(match.group(1)) * (1000 if match.group(2) else 1)


def upstream_row(screen: str, name: str) -> list[str] | None:
    for line in screen.splitlines():
        if line.startswith(name + " "):
            return line.split()
    return None


async def test_live_view_shows_traffic_and_q_restores_the_terminal(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmux: Tmux, tmp_path: Path
) -> None:
    metrics = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics}")
    await asyncio.to_thread(wait_for_metrics, metrics)
    name = f"quic://127.0.0.1:{upstream.port}"
    traffic = asyncio.ensure_future(query_loop(proxy))
    try:
        tmux.type(top_command(metrics, tmp_path))

        def busy(screen: str) -> bool:
            row = upstream_row(screen, name)
            # columns: upstream, state, rtt (2 words), q/s, share, ...
            return bool((rate_now(screen) or 0) > 0 and row and float(row[4]) > 0)

        screen = await tmux.wait_for(busy, "upstream row with traffic")
        assert (
            "doqproxy 0.1.0" in screen
            and f"loop {EVENT_LOOP}" in screen
            and f"quic {engine.NAME}" in screen
        )
        row = upstream_row(screen, name)
        assert row is not None and row[5] == "100%" and row[6] == "1"  # share, connections
        assert "q quits" in screen and "Traceback" not in screen
    finally:
        traffic.cancel()
    tmux.keys("q")
    screen = await tmux.wait_for(lambda s: "top-exited rc=0" in s, "exit status 0")
    await tmux.wait_for(lambda s: s.rstrip().endswith(PROMPT.rstrip()), "prompt")
    settings_unchanged(tmp_path)
    assert "Traceback" not in screen
    assert proxy.stop() == 0


async def test_a_forwarder_going_away_shows_disconnected(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmux: Tmux, tmp_path: Path
) -> None:
    metrics = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics}")
    await asyncio.to_thread(wait_for_metrics, metrics)
    name = f"quic://127.0.0.1:{upstream.port}"
    tmux.type(top_command(metrics, tmp_path))
    await tmux.wait_for(lambda s: upstream_row(s, name) is not None, "upstream row")
    assert proxy.stop() == 0
    screen = await tmux.wait_for(
        lambda s: "disconnected, retrying: connection refused" in s, "disconnected"
    )
    assert upstream_row(screen, name) is not None  # the last figures stay up
    assert "Traceback" not in screen
    tmux.keys("C-c")
    screen = await tmux.wait_for(lambda s: "top-exited rc=0" in s, "exit status 0")
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen
    settings_unchanged(tmp_path)


async def test_sigterm_restores_the_terminal(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmux: Tmux, tmp_path: Path
) -> None:
    metrics = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics}")
    await asyncio.to_thread(wait_for_metrics, metrics)
    tmux.type(top_command(metrics, tmp_path))
    await tmux.wait_for(lambda s: "q quits" in s, "live view")
    os.kill(tmux.shell_child(), signal.SIGTERM)  # the top we started, by its own pid
    screen = await tmux.wait_for(lambda s: "top-exited rc=0" in s, "exit status 0")
    assert "Traceback" not in screen
    settings_unchanged(tmp_path)
    assert proxy.stop() == 0


async def test_unreachable_in_a_terminal_is_one_line(tmux: Tmux, tmp_path: Path) -> None:
    port = free_port()
    tmux.type(
        f'{sys.executable} -m doqproxy top --metrics 127.0.0.1:{port}; echo "top-exited rc=$?"'
    )
    screen = await tmux.wait_for(lambda s: "top-exited rc=1" in s, "exit status 1")
    lines = [line for line in screen.splitlines() if line.strip()]
    error = lines.index(next(line for line in lines if line.startswith("Error: ")))
    assert lines[error + 1] == "top-exited rc=1"
    assert f"--metrics-listen 127.0.0.1:{port}?" in lines[error]
