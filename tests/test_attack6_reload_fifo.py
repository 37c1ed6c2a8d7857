"""SIGHUP when the configuration file has been replaced by a FIFO (found by attack
session 6): reading it blocked the event loop in open() until some writer came, so
the forwarder stopped answering and SIGTERM no longer ended it. The reload must be
refused with a clear line, and the forwarder keep running and stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .conftest import ProxyProcess, free_port


def test_sighup_with_a_fifo_as_config_is_refused(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    config.write_text(f'listen = ["127.0.0.1:{port}"]\nupstream = ["quic://127.0.0.1:9"]\n')
    proxy = ProxyProcess(
        ["forward", "--config", str(config), "--state-dir", str(tmp_path / "state")],
        port,
        tmp_path / "p.log",
    )
    try:
        proxy.wait_ready()
        config.unlink()
        os.mkfifo(config)
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload" not in proxy.stderr().split("SIGHUP: reloading", 1)[-1]:
            assert time.monotonic() < deadline, proxy.stderr()
            time.sleep(0.05)
        proxy.wait_ready()  # still accepting
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=15) == 0, proxy.stderr()
        assert "not a regular file" in proxy.stderr()
        assert "Traceback" not in proxy.stderr()
    finally:
        proxy.stop()
