"""SIGHUP with settings that only apply at start-up: said, kept, and compared with
what runs on the next reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.asyncquery
import dns.message

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port, reloaded
from .doq_fixture import DoqTestUpstream

WARNING = "cannot change without a restart"


async def _ask(port: int, name: str) -> str:
    query = dns.message.make_query(name, "A")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)
    return str(response.answer[0][0])


async def test_start_up_settings_are_kept_and_said(certs: Certs, tmp_path: Path) -> None:
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file)
    await upstream.start()
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    first_state, second_state = tmp_path / "state-a", tmp_path / "state-b"

    def configure(state: Path, idle: float, timeout: float) -> None:
        config.write_text(
            f'listen = ["127.0.0.1:{port}"]\n'
            f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
            f'upstream = "quic://127.0.0.1:{upstream.port}"\nstate-dir = "{state}"\n'
            f"tcp-idle-timeout = {idle}\ntimeout = {timeout}\n"
        )

    configure(first_state, 60.0, 5.0)
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert await _ask(port, "a.test.") == "192.0.2.1"

        configure(second_state, 30.0, 4.0)
        log = await reloaded(proxy, 1)
        assert "reload: --state-dir cannot change without a restart; keeping the old" in log
        assert "reload: the --tcp-* limits cannot change without a restart" in log
        assert log.count(WARNING) == 2, log
        assert await _ask(port, "n1.test.") == "192.0.2.11"

        # The same file again: still not what runs, so said again.
        log = await reloaded(proxy, 2)
        assert log.count(WARNING) == 4, log
        # Back to what runs: nothing to say (the reload compares with what runs, not
        # with the file it read last).
        configure(first_state, 60.0, 4.0)
        log = await reloaded(proxy, 3)
        assert log.count(WARNING) == 4, log

        assert proxy.stop() == 0
        assert not second_state.exists()  # never used
        assert (first_state / "tickets.json").exists()  # the forwarder kept writing here
    finally:
        proxy.stop()
        await upstream.stop()
