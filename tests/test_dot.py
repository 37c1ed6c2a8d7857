"""DNS over TLS: the DoT upstream against a local DoT server (in process, and through
``doqproxy forward``), checked also with kdig as an independent client; SPKI pins
for DoT and DoQ."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest
from cryptography import x509

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.dot import DotUpstream, tls_context
from doqproxy.upstream.pins import spki_sha256

from .conftest import SERVER_NAME, Certs
from .doq_fixture import DoqTestUpstream
from .dot_fixture import DotTestServer
from .serve_helpers import rcode_of, rdatas


@pytest.fixture
async def dot_server(certs: Certs) -> AsyncIterator[DotTestServer]:
    server = DotTestServer(certs.cert_file, certs.key_file)
    await server.start()
    yield server
    await server.stop()


def _prepared(name: str, rdtype: str = "A", pad: int | None = 128) -> tuple[bytes, wire.Question]:
    data = dns.message.make_query(name, rdtype).to_wire()
    question = wire.parse_question(data)
    return rewrite.upstream_query(data, question, pad_block=pad), question


def _pin(cert_file: str) -> str:
    with open(cert_file, "rb") as handle:
        return spki_sha256(x509.load_pem_x509_certificate(handle.read()))


def _ede_text(reply: dns.message.Message) -> str:
    return " ".join(
        getattr(option, "text", "") or ""
        for option in reply.options
        if option.otype == dns.edns.EDE
    )


async def test_pipelined_queries_on_one_connection_matched_by_id(
    dot_server: DotTestServer, certs: Certs
) -> None:
    dot_server.state.slow_delay = 1.0
    upstream = DotUpstream(
        UpstreamUrl("tls", "127.0.0.1", dot_server.port),
        tls_context(certs.ca_file),
        server_name=SERVER_NAME,
    )
    try:
        slow = asyncio.ensure_future(upstream.query(*_prepared("slow.test")))
        await asyncio.sleep(0.1)
        fast = [upstream.query(*_prepared(f"n{i}.test")) for i in range(20)]
        answers = await asyncio.wait_for(asyncio.gather(*fast), 10)
        assert not slow.done()  # the later queries overtook it
        for i, data in enumerate(answers):
            reply = dns.message.from_wire(data)
            assert reply.id == 0 and rdatas(reply) == [f"192.0.2.{i + 10}"]
        assert rdatas(dns.message.from_wire(await asyncio.wait_for(slow, 10))) == ["192.0.2.9"]
        assert dot_server.state.connections == 1 and upstream.connections_opened == 1
        ids = [seen.msg_id for seen in dot_server.state.seen]
        assert 0 not in ids and len(set(ids)) == len(ids)
        assert all(seen.padded for seen in dot_server.state.seen)
    finally:
        await upstream.aclose()


async def test_reconnects_after_the_server_closes(dot_server: DotTestServer, certs: Certs) -> None:
    upstream = DotUpstream(
        UpstreamUrl("tls", "127.0.0.1", dot_server.port), tls_context(certs.ca_file)
    )
    try:
        await upstream.query(*_prepared("a.test"))
        for writer in list(dot_server._writers):
            writer.close()
        await asyncio.sleep(0.2)
        reply = dns.message.from_wire(await upstream.query(*_prepared("n1.test")))
        assert rdatas(reply) == ["192.0.2.11"]
        assert dot_server.state.connections == 2
    finally:
        await upstream.aclose()


async def test_verification_and_pins(dot_server: DotTestServer, certs: Certs) -> None:
    url = UpstreamUrl("tls", "127.0.0.1", dot_server.port)
    wrong_ca = DotUpstream(url, tls_context(certs.other_ca_file))
    with pytest.raises(UpstreamError, match="verification failed"):
        await wrong_ca.query(*_prepared("a.test"))
    wrong_name = DotUpstream(url, tls_context(certs.ca_file), server_name="other.test")
    with pytest.raises(UpstreamError, match="verification failed"):
        await wrong_name.query(*_prepared("a.test"))
    pinned = DotUpstream(url, tls_context(certs.ca_file), pins=(_pin(certs.cert_file),))
    assert rdatas(dns.message.from_wire(await pinned.query(*_prepared("a.test")))) == ["192.0.2.1"]
    await pinned.aclose()
    mismatch = DotUpstream(url, tls_context(certs.ca_file), pins=("A" * 43 + "=",))
    with pytest.raises(UpstreamError, match="pin mismatch"):
        await mismatch.query(*_prepared("a.test"))


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig not installed")
async def test_fixture_speaks_dot_to_kdig(dot_server: DotTestServer, certs: Certs) -> None:
    process = await asyncio.create_subprocess_exec(
        "kdig", "@127.0.0.1", "-p", str(dot_server.port), f"+tls-ca={certs.ca_file}",
        f"+tls-hostname={SERVER_NAME}", "+short", "a.test", "A",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert out.decode().split() == ["192.0.2.1"], err


async def _ask(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=15)


async def test_forward_routes_to_tls_upstream(
    dot_server: DotTestServer, upstream: DoqTestUpstream, start_proxy: object
) -> None:
    proxy = start_proxy(  # type: ignore[operator]
        upstream.port, "--route", f"n5.test=tls://127.0.0.1:{dot_server.port}"
    )
    assert rdatas(await _ask(proxy.port, "n5.test")) == ["192.0.2.15"]
    assert dot_server.names() == ["n5.test."]
    assert "n5.test." not in upstream.seen_names()


async def test_forward_spki_pin_match_and_mismatch(
    upstream: DoqTestUpstream, start_proxy: object, certs: Certs
) -> None:
    good = start_proxy(  # type: ignore[operator]
        upstream.port, "--tls-pin-sha256", f"{SERVER_NAME}={_pin(certs.cert_file)}"
    )
    assert rdatas(await _ask(good.port, "a.test")) == ["192.0.2.1"]
    bad = start_proxy(  # type: ignore[operator]
        upstream.port, "--tls-pin-sha256", f"{SERVER_NAME}={'B' * 43}="
    )
    reply = await _ask(bad.port, "n1.test")
    assert rcode_of(reply) == "SERVFAIL"
    assert "pin mismatch" in _ede_text(reply), reply
    assert "n1.test." not in upstream.seen_names()


async def test_idle_connection_is_closed_and_reopened_on_demand(
    dot_server: DotTestServer, certs: Certs
) -> None:
    upstream = DotUpstream(
        UpstreamUrl("tls", "127.0.0.1", dot_server.port),
        tls_context(certs.ca_file),
        idle_timeout=0.3,
    )
    try:
        await upstream.query(*_prepared("a.test"))
        for _ in range(100):  # closed after 0.3 s without queries
            if upstream._conn is None:
                break
            await asyncio.sleep(0.05)
        assert upstream._conn is None
        reply = dns.message.from_wire(await upstream.query(*_prepared("n2.test")))
        assert rdatas(reply) == ["192.0.2.12"]
        assert upstream.connections_opened == 2 and dot_server.state.connections == 2
    finally:
        await upstream.aclose()
