"""Review of the held SIGHUP: one kept from start-up must not be applied once the
forwarder is shutting down (a SIGTERM that came while the listeners started)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .conftest import ManagedProcess, free_port

_SIGHUP_THEN_SIGTERM = """
import asyncio, builtins, os, signal, sys

real_import = builtins.__import__


def hooked(name, *args, **kwargs):
    if name == "doqproxy.cli":  # held from here by the doqproxy entry point
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGHUP)
    return real_import(name, *args, **kwargs)


real_start_server = asyncio.start_server


async def start_server(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # while the listeners come up
    await asyncio.sleep(0.5)
    return await real_start_server(*args, **kwargs)


builtins.__import__ = hooked
asyncio.start_server = start_server
sys.argv = ["doqproxy", *sys.argv[1:]]
from doqproxy.__main__ import run

run()
"""


async def test_a_held_sighup_is_not_applied_while_shutting_down(tmp_path: Path) -> None:
    """Before, Operations.start scheduled the held reload, the stop that had already
    come went straight to the shutdown, and the reload ran while it drained (after
    ops.stopping(), which is meant to end reloads)."""
    port = free_port()
    argv = [
        sys.executable, "-c", _SIGHUP_THEN_SIGTERM,
        "forward", "-v", "-l", f"127.0.0.1:{port}",
        "-u", f"quic://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    proxy = ManagedProcess(argv, tmp_path / "p.log")
    try:
        status = await asyncio.to_thread(proxy.proc.wait, 60)
        log = proxy.stderr()
        assert status == 0, log
        assert "shutting down" in log, log
        assert "SIGHUP: reloading" not in log.split("shutting down", 1)[1], log
    finally:
        proxy.stop()
