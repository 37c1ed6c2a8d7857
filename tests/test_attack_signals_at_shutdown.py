"""SIGHUP or SIGUSR1 while the forwarder shuts down (queries still draining) must not
end it with their default action: it exits 0, as for SIGTERM alone (found by the
attack session: exit 129, and reloads ran during the shutdown)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import pytest

from .cache_fakes import make_query
from .conftest import ProxyProcess, free_port


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
async def test_signals_during_shutdown_are_not_fatal(tmp_path: Path, signum: int) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an upstream that never answers
    silent.bind(("127.0.0.1", 0))
    port = free_port()
    proxy = ProxyProcess(
        [
            "forward", "-l", f"127.0.0.1:{port}", "--timeout", "30",
            "-u", f"quic://127.0.0.1:{silent.getsockname()[1]}",
            "--state-dir", str(tmp_path / "state"),
        ],
        port,
        tmp_path / "p.log",
    )  # fmt: skip
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await asyncio.to_thread(proxy.wait_ready)
        for i in range(5):  # pending for the whole shutdown grace
            client.sendto(make_query(f"q{i}.example."), ("127.0.0.1", port))
        await asyncio.sleep(0.5)
        proxy.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while proxy.proc.poll() is None and time.monotonic() < deadline:
            proxy.proc.send_signal(signum)
            await asyncio.sleep(0.005)
        assert proxy.proc.wait(timeout=5) == 0, proxy.stderr()
        assert "Traceback" not in proxy.stderr()
    finally:
        client.close()
        silent.close()
        proxy.stop()
