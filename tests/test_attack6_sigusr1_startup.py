"""SIGUSR1 while ``doqproxy forward`` is still starting (found by attack session 6).

SIGHUP is held from the command's first step (ops/early.py), but SIGUSR1 kept its
default action until the loop took the signals: a ``kill -USR1`` (a monitoring
script asking for the stats) during the imports or the listeners' set-up ended the
forwarder with status 138. It must be ignored until the stats can be logged."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from .conftest import ProxyProcess, free_port, tcp_accepting


def _caught(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


def test_sigusr1_during_start_up_is_not_fatal(tmp_path: Path) -> None:
    port = free_port()
    proxy = ProxyProcess(
        [
            "forward", "-l", f"127.0.0.1:{port}", "-u", "quic://127.0.0.1:9",
            "--state-dir", str(tmp_path / "state"),
        ],
        port,
        tmp_path / "p.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        # The interpreter's own start-up cannot be protected: start once SIGHUP is held.
        while not _caught(proxy.proc.pid) & (1 << (signal.SIGHUP - 1)):
            assert proxy.proc.poll() is None and time.monotonic() < deadline, proxy.stderr()
            time.sleep(0.001)
        ready: float | None = None  # go on 0.5 s past the listeners, to the loop's handler
        while proxy.proc.poll() is None and (ready is None or time.monotonic() < ready + 0.5):
            assert time.monotonic() < deadline, proxy.stderr()
            proxy.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.002)
            if ready is None and tcp_accepting(port):
                ready = time.monotonic()
        assert proxy.proc.poll() is None, f"exit {proxy.proc.returncode}\n{proxy.stderr()}"
        proxy.wait_ready()
        proxy.proc.send_signal(signal.SIGUSR1)  # now logs the counts
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=15) == 0, proxy.stderr()
        assert "Traceback" not in proxy.stderr()
    finally:
        proxy.stop()
