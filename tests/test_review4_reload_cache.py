"""Review of the restart-only settings on SIGHUP: turning the cache on or off is one
of them, so the settings kept must be the running cache's, as for the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port, reloaded
from .doq_fixture import DoqTestUpstream

WARNING = "turning the cache on or off needs a restart"


async def test_cache_off_is_said_on_every_reload_while_the_cache_runs(
    certs: Certs, tmp_path: Path
) -> None:
    """Before, the first reload said it and stored "no cache" as if it ran: the same
    file again was silent, though the cache still answered."""
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file)
    await upstream.start()
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    base = (
        f'listen = ["127.0.0.1:{port}"]\n'
        f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'upstream = "quic://127.0.0.1:{upstream.port}"\nstate-dir = "{tmp_path / "state"}"\n'
    )
    config.write_text(base)
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        config.write_text(base + "no-cache = true\n")
        log = await reloaded(proxy, 1)
        assert log.count(WARNING) == 1, log
        log = await reloaded(proxy, 2)
        assert log.count(WARNING) == 2, log
        config.write_text(base)  # back to what runs: nothing to say
        log = await reloaded(proxy, 3)
        assert log.count(WARNING) == 2, log
    finally:
        proxy.stop()
        await upstream.stop()
