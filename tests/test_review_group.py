"""Review findings in the upstream group's race (in-process upstreams, as in
test_upstream_group)."""

from __future__ import annotations

import asyncio

import dns.edns
import dns.message
import dns.rcode

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import parse_upstream
from doqproxy.upstream.group import Member, UpstreamGroup
from doqproxy.upstream.health import Health
from doqproxy.upstream.plain import PlainUpstream
from doqproxy.upstream.selection import Strategy

from .test_upstream_group import Fake, after, failing, group_of, make_question, never


async def test_a_servfail_then_a_stalled_second_chance_does_not_wait_the_whole_timeout() -> None:
    """After a SERVFAIL the group asks one other upstream; when that one stalled, the
    held SERVFAIL disabled hedging and the client waited the group's whole budget
    (about --timeout) for it. Now the second chance gets one hedge delay."""
    bad = Fake("quic://a:853", after(0.0, dns.rcode.SERVFAIL))
    stalled = Fake("quic://b:853", never())
    spare = Fake("quic://c:853", after(0.0))
    group = group_of(
        bad, stalled, spare, srtts=(0.001, 0.002, 0.003), timeout=5.0,
        hedge_min=0.02, hedge_max=0.05,
    )  # fmt: skip
    data, question = make_question()
    answer = await asyncio.wait_for(group.query(data, question), 2.0)
    assert wire.get_rcode(answer) == dns.rcode.SERVFAIL
    assert (bad.calls, stalled.calls) == (1, 1)
    await asyncio.sleep(0.01)
    assert stalled.cancelled == 1


async def test_parallel_servfail_leaves_the_slower_racer_its_own_hedge_delay() -> None:
    """Racing two, a quick SERVFAIL must not cut off the other racer before its own
    hedge delay: its NOERROR answer wins."""
    slower = Fake("quic://a:853", after(0.15))  # not measured yet: raced first
    bad = Fake("quic://b:853", after(0.0, dns.rcode.SERVFAIL))
    group = group_of(
        slower, bad, srtts=(None, 0.001), strategy=Strategy.PARALLEL, parallel=2,
        hedge_min=0.02, hedge_max=0.5,
    )  # fmt: skip
    data, question = make_question()
    answer = await asyncio.wait_for(group.query(data, question), 2.0)
    assert wire.get_rcode(answer) == dns.rcode.NOERROR


class Recorder(asyncio.DatagramProtocol):
    """A plain DNS server that answers NOERROR and keeps every query it gets."""

    def __init__(self) -> None:
        self.queries: list[dns.message.Message] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        self.queries.append(query)
        self.transport.sendto(dns.message.make_response(query).to_wire(), addr)


async def test_a_route_group_never_sends_padding_to_plain_dns() -> None:
    """A route naming a DoQ and a plain upstream became one group padded for DoQ (the
    group's pad block is its first padded member's); the plain member got the padded
    query as it was. RFC 8467 padding is for encrypted transports only."""
    loop = asyncio.get_running_loop()
    transport, recorder = await loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    encrypted = Fake("quic://a:853", failing("connection failed: refused"))
    encrypted.pad_block = 128
    plain = PlainUpstream(parse_upstream(f"udp://127.0.0.1:{port}", ("udp",)))
    group = UpstreamGroup(
        [Member("a", encrypted, Health()), Member("b", plain, Health())], timeout=2.0
    )
    assert group.pad_block == 128
    query = dns.message.make_query("a.test.", "A", use_edns=0)
    query.id = 0
    raw = query.to_wire()
    question = wire.parse_question(raw)
    data = rewrite.upstream_query(raw, question, pad_block=group.pad_block)
    assert dns.message.from_wire(data).options[-1].otype == dns.edns.PADDING
    try:
        answer = await asyncio.wait_for(group.query(data, question), 5)
        assert wire.get_rcode(answer) == dns.rcode.NOERROR
        assert recorder.queries
        for seen in recorder.queries:
            assert all(option.otype != dns.edns.PADDING for option in seen.options)
    finally:
        await plain.aclose()
        transport.close()
