"""Stream credit: the client never opens, resets or stops a stream the server has not
allowed, so bursts of slow queries never make it close with STREAM_LIMIT_ERROR (0x4)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Callable

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream import engine
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pool import DoqUpstream, PoolSettings

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .serve_helpers import ServeCerts, ServeProcess, serve_certs, start_serve  # noqa: F401
from .slow_dns import SlowDnsServer

StartProxy = Callable[..., ProxyProcess]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(doqproxy_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


@pytest.fixture
async def slow_dns() -> AsyncIterator[SlowDnsServer]:
    server = SlowDnsServer(delay=2.5)
    await server.start()
    yield server
    await server.stop()


async def ask(port: int, name: str, wait: float = 15) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=wait)


async def test_burst_of_slow_queries_never_breaks_the_servers_stream_limit(
    slow_dns: SlowDnsServer,
    start_serve: Callable[..., ServeProcess],  # noqa: F811
    serve_certs: ServeCerts,  # noqa: F811
    start_proxy: StartProxy,
) -> None:
    metrics_port = free_port()
    server = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
        "-u", slow_dns.url, "--max-streams", "10", "--timeout", "10",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    proxy = start_proxy(
        server.port, "--timeout", "1", "-v", "--tls-server-name", "serve.doq.test",
        ca_file=serve_certs.ca_file,
    )  # fmt: skip
    # 50 at once, each given up after 1 s, while the server needs 2.5 s for every one.
    replies = await asyncio.gather(*(ask(proxy.port, f"q{i}.burst.test.") for i in range(50)))
    assert all(reply.rcode() == dns.rcode.SERVFAIL for reply in replies)
    # The server answers again: queries succeed, on the connections already open.
    slow_dns.delay = 0.0
    await asyncio.sleep(3.0)  # the server finishes the slow ones
    replies = await asyncio.gather(*(ask(proxy.port, f"r{i}.burst.test.") for i in range(50)))
    assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies), proxy.stderr()
    metrics = scrape(metrics_port)
    broken = {key: value for key, value in metrics.items() if "closes" in key and value}
    assert 'doqproxy_serve_transport_closes_total{code="0x4"}' not in broken, broken
    assert not [key for key in broken if "PROTOCOL_ERROR" in key], broken
    assert "code 0x4" not in proxy.stderr()


@pytest.mark.parametrize("quic_engine", engine.installed())
async def test_pool_never_puts_more_queries_on_a_connection_than_its_credit(
    certs: Certs, quic_engine: str
) -> None:
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file, max_streams=5)
    upstream.state.slow_delay = 1.5
    await upstream.start()
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(
        SERVER_NAME, ca_file=certs.ca_file, quic_engine=quic_engine
    )
    settings = PoolSettings(max_connections=2, max_queue=100, quic_engine=quic_engine)
    pool = DoqUpstream(url, configuration, settings)
    data = dns.message.make_query("slow.test.", "A").to_wire()
    question = wire.parse_question(data)
    message = rewrite.upstream_query(data, question, pad_block=128)
    beyond: list[int] = []

    async def one(patience: float) -> bytes | str:
        try:
            async with asyncio.timeout(patience):
                return await pool.query(message, question)
        except (TimeoutError, UpstreamError) as exc:
            return repr(exc)

    async def watch() -> None:
        while True:
            for conn in pool.connections:
                if conn.usable and conn.handshake_complete:
                    session = conn.session
                    beyond.append(session.streams_opened - session.stream_limit)
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    try:
        # Half of them give up while they wait for credit, half wait for their answers.
        results = await asyncio.gather(
            *(one(0.5) for _ in range(20)), *(one(20.0) for _ in range(20))
        )
    finally:
        watcher.cancel()
        await pool.aclose()
        await upstream.stop()
    assert beyond and max(beyond) <= 0, "a stream was opened beyond the server's credit"
    assert 0x4 not in upstream.state.close_codes, upstream.state.close_codes
    failed = [result for result in results[20:] if isinstance(result, str)]
    assert not failed, failed
