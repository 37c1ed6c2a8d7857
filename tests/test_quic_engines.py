"""What depends on the QUIC engine, on every engine installed here (``--quic-engine``):
0-RTT accepted after a restart, Retry plus 0-RTT, rejected early data resent at once,
and the pool's stream credit. The forward processes get the engine through
DOQPROXY_QUIC_ENGINE, so the same checks run unchanged on each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from doqproxy.upstream import engine

from .conftest import Certs, ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]

pytestmark = pytest.mark.parametrize("quic_engine", engine.installed())


@pytest.fixture(autouse=True)
def _engine(quic_engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOQPROXY_QUIC_ENGINE", quic_engine)


async def ask(proxy: ProxyProcess, name: str = "a.test.") -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)


async def wait_for(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def engine_logged(proxy: ProxyProcess, quic_engine: str) -> bool:
    return f"QUIC engine {quic_engine} " in proxy.stderr()


async def test_first_query_after_restart_is_accepted_early_data(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path, quic_engine: str
) -> None:
    state_dir = tmp_path / "persist"
    proxy = start_proxy(upstream.port, "--state-dir", str(state_dir), "-v")
    assert (await ask(proxy)).answer
    assert engine_logged(proxy, quic_engine), proxy.stderr()
    await wait_for(lambda: (state_dir / "tickets.json").exists())
    assert proxy.stop() == 0
    proxy = start_proxy(upstream.port, "--state-dir", str(state_dir))
    assert (await ask(proxy, "n1.test.")).answer
    assert upstream.state.early_accepted == 1
    assert upstream.state.seen[-1].early, "the first query was not sent as early data"


async def test_retry_plus_early_data(certs: Certs, start_proxy: StartProxy) -> None:
    server = DoqTestUpstream(certs.cert_file, certs.key_file, retry=True)
    await server.start()
    try:
        proxy = start_proxy(server.port, "--timeout", "4")
        assert (await ask(proxy)).answer
        await wait_for(lambda: bool(server.state.tickets))
        server.close_all_connections()
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await ask(proxy, "n2.test.")
        assert reply.rcode() == dns.rcode.NOERROR, proxy.stderr()
        # Lost early data would only come back at the 4 s timeout (or never).
        assert loop.time() - started < 2, "the early query was lost after Retry"
    finally:
        await server.stop()


async def test_rejected_early_data_is_resent_at_once(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--timeout", "4")
    assert (await ask(proxy)).answer
    await wait_for(lambda: bool(upstream.state.tickets))
    upstream.forget_tickets()
    upstream.close_all_connections()
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await ask(proxy, "n3.test.")).answer
    assert loop.time() - started < 1.5, "rejected early data waited for loss detection"
    assert upstream.state.early_accepted == 0


async def test_stream_limit_5_with_100_concurrent_queries(
    certs: Certs, start_proxy: StartProxy
) -> None:
    server = DoqTestUpstream(certs.cert_file, certs.key_file, max_streams=5)
    await server.start()
    try:
        proxy = start_proxy(server.port, "--timeout", "20")
        replies = await asyncio.gather(*(ask(proxy, f"n{i % 64}.test.") for i in range(100)))
        assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies)
        assert 0x4 not in server.state.close_codes
    finally:
        await server.stop()
