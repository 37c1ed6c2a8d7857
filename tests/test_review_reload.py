"""Review finding: a SIGHUP whose new routes cannot be built keeps the old configuration
(it raised out of the signal handler, half applied)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import dns.asyncquery
import dns.message

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port


async def _wait_for_log(proxy: ProxyProcess, text: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if text in proxy.stderr():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{proxy.stderr()}")


async def _localhost(port: int) -> list[str]:
    query = dns.message.make_query("localhost.", "A")
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)
    return [rd.to_text() for rrset in reply.answer for rd in rrset]


async def test_reload_with_routes_that_cannot_be_built_keeps_the_old_config(
    tmp_path: Path, certs: Certs
) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copy(certs.ca_file, ca_file)
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    base = (
        f'listen = ["127.0.0.1:{port}"]\n'
        f'upstream = "quic://127.0.0.1:{free_port()}"\n'
        f'tls-ca-file = "{ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'state-dir = "{tmp_path}/state"\n'
    )
    config.write_text(base)
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert await _localhost(port) == ["127.0.0.1"]  # answered: the SIGHUP handler is set
        # The CA file goes bad (a botched update), and a DoT route is added.
        ca_file.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        config.write_text(
            base
            + f'[[route]]\ndomains = ["corp.test"]\nupstreams = ["tls://127.0.0.1:{free_port()}"]\n'
        )
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload failed, keeping the old configuration")
        assert "Traceback" not in proxy.stderr()
        assert await _localhost(port) == ["127.0.0.1"]
        assert proxy.stop() == 0
    finally:
        proxy.stop()


async def test_sighup_with_a_query_log_that_cannot_be_reopened_still_reloads(
    tmp_path: Path,
) -> None:
    """SIGHUP reopens the query log (rotation) before reloading; when the path could
    not be opened (rotated away, and the new path not creatable), the OSError ended the
    handler: a traceback, no reload, and systemd left waiting in RELOADING."""
    port = free_port()
    query_log = tmp_path / "queries.jsonl"
    proxy = ProxyProcess(
        [
            "forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{free_port()}",
            "--query-log", str(query_log), "--state-dir", str(tmp_path / "state"),
        ],
        port,
        tmp_path / "p.log",
    )  # fmt: skip
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert await _localhost(port) == ["127.0.0.1"]
        query_log.rename(tmp_path / "queries.jsonl.1")
        query_log.mkdir()  # what is there now cannot be opened for writing
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload: done")
        assert "Traceback" not in proxy.stderr()
        assert "cannot reopen the query log" in proxy.stderr()
        assert await _localhost(port) == ["127.0.0.1"]
        assert proxy.stop() == 0
    finally:
        proxy.stop()
