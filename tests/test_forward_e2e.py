"""``doqproxy forward`` end to end: a real proxy process, the aioquic test upstream,
and real clients (dnspython, dig)."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]


async def udp(
    proxy: ProxyProcess, name: str, rdtype: str = "A", **kw: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)


async def tcp(
    proxy: ProxyProcess, name: str, rdtype: str = "A", **kw: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    return await dns.asyncquery.tcp(query, "127.0.0.1", port=proxy.port, timeout=10)


@pytest.mark.parametrize("transport", [udp, tcp])
@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("a.test.", "A", "192.0.2.1"),
        ("a.test.", "AAAA", "2001:db8::1"),
        ("a.test.", "TXT", '"hello world"'),
        ("a.test.", "MX", "10 mail.a.test."),
    ],
)
async def test_record_types(
    upstream: DoqTestUpstream, start_proxy: StartProxy, transport, name, rdtype, expected
) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(upstream.port)
    response = await transport(proxy, name, rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer[0][0].to_text() == expected


async def test_nxdomain_over_udp_and_tcp(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    for transport in (udp, tcp):
        response = await transport(proxy, "nope.test.")
        assert response.rcode() == dns.rcode.NXDOMAIN
        assert response.authority[0].rdtype == dns.rdatatype.SOA


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode()


async def test_dig_udp_and_tcp(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port)
    base = ["dig", "@127.0.0.1", "-p", str(proxy.port), "+time=5", "+tries=1"]
    for extra in ([], ["+tcp"]):
        assert (await run(*base, *extra, "+short", "a.test", "A")).strip() == "192.0.2.1"
        assert (await run(*base, *extra, "+short", "a.test", "MX")).strip() == "10 mail.a.test."
        out = await run(*base, *extra, "nope.test", "A")
        assert "status: NXDOMAIN" in out


async def test_500_concurrent_udp_ids_restored(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    rng = random.Random(7)

    async def one(index: int) -> None:
        query = dns.message.make_query(f"n{index % 64}.test.", "A")
        query.id = rng.randrange(1, 65536)
        response = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=20)
        assert response.id == query.id
        assert response.answer[0][0].address == f"192.0.2.{index % 64 + 10}"

    await asyncio.gather(*(one(i) for i in range(500)))
    ids = upstream.ids_seen()
    assert len(ids) == 500
    assert set(ids) == {0}


async def test_tcp_pipelining_50_queries(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    queries = {}
    payload = b""
    for index in range(50):
        query = dns.message.make_query(f"n{index}.test.", "A")
        query.id = 1000 + index
        queries[query.id] = query
        wire = query.to_wire()
        payload += struct.pack("!H", len(wire)) + wire
    writer.write(payload)
    await writer.drain()
    answered = {}
    for _ in range(50):
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
        response = dns.message.from_wire(await reader.readexactly(length))
        assert response.question == queries[response.id].question
        answered[response.id] = response
    assert sorted(answered) == sorted(queries)
    writer.close()


async def test_truncation_and_tcp_retry(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port)
    # No EDNS: 512 octets; the ~800-octet answer is truncated.
    response = await udp(proxy, "mid.test.", "TXT")
    assert response.flags & dns.flags.TC
    assert not response.answer and response.question[0].name.to_text() == "mid.test."
    assert response.edns < 0
    # EDNS 1232 lets it through; the 16 KB one is truncated but keeps OPT.
    response = await udp(proxy, "mid.test.", "TXT", use_edns=0, payload=1232)
    assert not response.flags & dns.flags.TC and len(response.answer[0]) == 3
    response = await udp(proxy, "big.test.", "TXT", use_edns=0, payload=1232)
    assert response.flags & dns.flags.TC and response.edns == 0
    # A payload size under 512 counts as 512.
    response = await udp(proxy, "a.test.", "TXT", use_edns=0, payload=100)
    assert not response.flags & dns.flags.TC
    # The TCP retry gets everything.
    response = await tcp(proxy, "big.test.", "TXT")
    assert not response.flags & dns.flags.TC
    assert len(response.answer[0]) == 64
    assert len(response.to_wire()) > 16000


async def test_response_split_into_many_stream_frames(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    response = await tcp(proxy, "split.test.", "TXT")
    assert len(response.answer[0]) == 5


async def test_keepalive_stripped_and_padding(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    keepalive = dns.edns.GenericOption(dns.edns.OptionType.KEEPALIVE, b"")
    response = await tcp(proxy, "a.test.", "A", use_edns=0, options=[keepalive])
    assert response.rcode() == dns.rcode.NOERROR
    await udp(proxy, "a.test.", "TXT")  # no EDNS from the client
    await udp(proxy, "a.test.", "AAAA", use_edns=0, payload=4096, want_dnssec=True)
    for seen in upstream.state.seen:
        assert len(seen.wire) % 128 == 0, len(seen.wire)
        codes = [option.otype for option in seen.message.options]
        assert dns.edns.OptionType.KEEPALIVE not in codes
        assert codes.count(dns.edns.OptionType.PADDING) == 1
    # The client that sent no EDNS gets none back; padding never reaches clients.
    response = await udp(proxy, "a.test.", "TXT")
    assert response.edns < 0
    response = await udp(proxy, "a.test.", "A", use_edns=0, payload=1232)
    assert response.edns == 0 and response.payload == 1232
    assert not [o for o in response.options if o.otype == dns.edns.OptionType.PADDING]


async def test_no_padding_flag(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, "--no-padding")
    await udp(proxy, "a.test.", "A")
    await udp(proxy, "a.test.", "A", use_edns=0)
    first, second = upstream.state.seen
    assert first.message.edns < 0
    assert not list(second.message.options)


async def test_upstream_down_then_back(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, "--timeout", "2")
    assert (await udp(proxy, "a.test.")).rcode() == dns.rcode.NOERROR
    await upstream.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await udp(proxy, "a.test.", use_edns=0)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert loop.time() - started < 2 + 1.5
    ede = [o for o in response.options if o.otype == dns.edns.OptionType.EDE]
    assert ede and "quic://127.0.0.1" in ede[0].text
    await upstream.start()
    deadline = loop.time() + 20
    while True:
        response = await udp(proxy, "a.test.")
        if response.rcode() == dns.rcode.NOERROR or loop.time() > deadline:
            break
        await asyncio.sleep(0.3)
    assert response.rcode() == dns.rcode.NOERROR, proxy.stderr()


async def test_stream_reset_fails_only_that_query(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 0.5
    proxy = start_proxy(upstream.port)
    slow = asyncio.ensure_future(udp(proxy, "slow.test."))
    await asyncio.sleep(0.1)
    reset = await udp(proxy, "reset.test.")
    assert reset.rcode() == dns.rcode.SERVFAIL
    assert (await slow).rcode() == dns.rcode.NOERROR
    assert (await udp(proxy, "a.test.")).rcode() == dns.rcode.NOERROR


async def test_tls_failure_is_servfail_with_reason(
    upstream: DoqTestUpstream, start_proxy: StartProxy, certs
) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(upstream.port, ca_file=certs.other_ca_file)
    response = await udp(proxy, "a.test.", use_edns=0)
    assert response.rcode() == dns.rcode.SERVFAIL
    ede = [o for o in response.options if o.otype == dns.edns.OptionType.EDE]
    assert ede and "TLS" in ede[0].text


async def test_timeout_gives_servfail(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    upstream.state.slow_delay = 5
    proxy = start_proxy(upstream.port, "--timeout", "0.5")
    response = await udp(proxy, "slow.test.")
    assert response.rcode() == dns.rcode.SERVFAIL
    assert (await udp(proxy, "a.test.")).rcode() == dns.rcode.NOERROR


async def test_sigterm_closes_upstream_with_no_error(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    assert (await udp(proxy, "a.test.")).rcode() == dns.rcode.NOERROR
    stopping = asyncio.get_running_loop().run_in_executor(None, proxy.stop)
    assert await stopping == 0
    for _ in range(50):
        if upstream.state.close_codes:
            break
        await asyncio.sleep(0.05)
    assert upstream.state.close_codes == [0]


async def test_closed_upstream_port_fails_fast_and_backs_off(start_proxy: StartProxy) -> None:
    from .conftest import free_port

    proxy = start_proxy(free_port(), "--timeout", "5")
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await udp(proxy, "a.test.", use_edns=0)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert loop.time() - started < 2, "ICMP port unreachable should fail the query at once"
    ede = [o for o in response.options if o.otype == dns.edns.OptionType.EDE]
    assert ede and "Connection refused" in ede[0].text
    # While backing off, further queries fail at once without a new attempt.
    response = await udp(proxy, "a.test.", use_edns=0)
    ede = [o for o in response.options if o.otype == dns.edns.OptionType.EDE]
    assert ede and ("next attempt in" in ede[0].text or "Connection refused" in ede[0].text)


async def test_blackholed_upstream_fails_within_timeout_then_fast(start_proxy: StartProxy) -> None:
    import socket

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads nothing, answers nothing
    sink.bind(("127.0.0.1", 0))
    try:
        proxy = start_proxy(sink.getsockname()[1], "--timeout", "1")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await udp(proxy, "a.test.")).rcode() == dns.rcode.SERVFAIL
        assert loop.time() - started < 2.5
        # The handshake deadline (= --timeout) has passed too: the connection is
        # given up and reconnecting backs off, so the next query fails at once.
        # (Backoff still allows an attempt per window, so allow a slow one on a busy box.)
        for _ in range(3):
            started = loop.time()
            response = await udp(proxy, "n1.test.", use_edns=0)
            assert response.rcode() == dns.rcode.SERVFAIL
            if loop.time() - started < 0.5:
                break
        else:
            raise AssertionError("backoff never answered at once")
        ede = [o for o in response.options if o.otype == dns.edns.OptionType.EDE]
        assert ede and ("no handshake within 1s" in ede[0].text or "next attempt" in ede[0].text)
    finally:
        sink.close()
