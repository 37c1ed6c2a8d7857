"""Review: a SIGHUP that changes quic-engine rebuilds the pools on the other engine,
while the forwarder's one ticket store still holds session tickets of the engine that
ran (qh3's and aioquic's ticket classes differ: naive vs aware dates). Checked: the
other engine takes them and resumes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port, reloaded
from .doq_fixture import DoqTestUpstream


async def _ask(port: int, name: str) -> int:
    query = dns.message.make_query(name, "A")
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)
    return reply.rcode()


@pytest.mark.parametrize(("first", "then"), [("qh3", "aioquic"), ("aioquic", "qh3")])
async def test_reload_to_the_other_engine_resumes_or_starts_afresh(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, then: str
) -> None:
    """The first query after the switch is answered, on a resumed session."""
    monkeypatch.delenv("DOQPROXY_QUIC_ENGINE", raising=False)
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file)
    await upstream.start()
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    base = (
        f'listen = ["127.0.0.1:{port}"]\n'
        f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'upstream = "quic://127.0.0.1:{upstream.port}"\nstate-dir = "{tmp_path / "state"}"\n'
    )
    config.write_text(base + f'quic-engine = "{first}"\n')
    proxy = ProxyProcess(["forward", "-v", "-v", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert await _ask(port, "before.example.") == dns.rcode.NXDOMAIN
        await asyncio.sleep(0.5)  # the server's session ticket arrives after the answer
        config.write_text(base + f'quic-engine = "{then}"\n')
        await reloaded(proxy)
        assert await _ask(port, "after.example.") == dns.rcode.NXDOMAIN, proxy.stderr()
        log = proxy.stderr()
        assert "Traceback" not in log
        assert "resumed=True" in log.split("reload: done")[1], log
    finally:
        proxy.stop()
        await upstream.stop()
