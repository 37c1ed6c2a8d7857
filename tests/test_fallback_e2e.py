"""``--fallback``: with the DoQ upstream's UDP port closed, answers arrive over DoT;
once DoQ is back, traffic returns to it. Both switches are logged and counted."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from .conftest import Certs, ProxyProcess, free_port, tcp_accepting
from .doq_fixture import DoqTestUpstream
from .dot_fixture import DotTestServer
from .serve_helpers import PlainDnsServer, rdatas


@pytest.fixture
async def dot_server(certs: Certs) -> AsyncIterator[DotTestServer]:
    server = DotTestServer(certs.cert_file, certs.key_file)
    await server.start()
    yield server
    await server.stop()


async def _ask(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=15)


def _metrics(port: int) -> str:
    for _ in range(100):  # the endpoint comes up just after the DNS listeners
        if not tcp_accepting(port):
            time.sleep(0.1)
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                return str(reply.read().decode())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no metrics endpoint on port {port}")


async def test_fallback_to_dot_and_back(
    dot_server: DotTestServer, certs: Certs, start_proxy: object, tmp_path: Path
) -> None:
    query_log = tmp_path / "queries.jsonl"
    doq_port = free_port()  # nothing listens there yet: ICMP port unreachable
    metrics_port = free_port()
    proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
        doq_port,
        "--fallback", f"tls://127.0.0.1:{dot_server.port}",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--query-log", str(query_log),
    )  # fmt: skip
    reply = await _ask(proxy.port, "a.test")
    assert rdatas(reply) == ["192.0.2.1"]
    assert dot_server.names() == ["a.test."]
    assert "using the fallback tls://127.0.0.1" in proxy.stderr()
    text = await asyncio.to_thread(_metrics, metrics_port)
    assert 'doqproxy_fallback_active{route="."} 1.0' in text
    assert 'doqproxy_fallback_switches_total{direction="to_fallback",route="."} 1.0' in text

    doq = DoqTestUpstream(certs.cert_file, certs.key_file, port=doq_port)
    await doq.start()
    try:
        deadline = time.monotonic() + 40
        index = 0
        while not doq.state.seen and time.monotonic() < deadline:
            index += 1
            reply = await _ask(proxy.port, f"n{index % 60}.test")
            assert rdatas(reply) == [f"192.0.2.{index % 60 + 10}"]  # never a SERVFAIL
            await asyncio.sleep(0.3)
        assert doq.state.seen, "traffic never returned to DoQ"
        await asyncio.sleep(0.5)
        before = len(dot_server.state.seen)
        assert rdatas(await _ask(proxy.port, "n61.test")) == ["192.0.2.71"]
        assert "n61.test." in doq.seen_names()
        assert len(dot_server.state.seen) == before
        assert "answers again; leaving the fallback" in proxy.stderr()
        text = await asyncio.to_thread(_metrics, metrics_port)
        assert 'doqproxy_fallback_active{route="."} 0.0' in text
        assert 'doqproxy_fallback_switches_total{direction="to_primary",route="."} 1.0' in text
        proxy.stop()
        answered = {}
        for line in query_log.read_text().splitlines():
            entry = json.loads(line)
            answered[entry["qname"]] = entry["upstream"]
        assert answered["a.test."] == f"tls://127.0.0.1:{dot_server.port}"
        assert answered["n61.test."] == f"quic://127.0.0.1:{doq_port}"
    finally:
        await doq.stop()


async def test_plain_dns_fallback_only_when_named_and_with_a_warning(start_proxy: object) -> None:
    plain = PlainDnsServer()
    await plain.start()
    try:
        proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
            free_port(), "--fallback", f"udp://127.0.0.1:{plain.port}"
        )
        reply = await _ask(proxy.port, "x.plain.test")
        assert rdatas(reply) == ["198.51.100.7"]
        assert plain.state.padded == [False]  # padding is for encrypted transports
        assert "(plain DNS, unencrypted)" in proxy.stderr()
    finally:
        await plain.stop()
