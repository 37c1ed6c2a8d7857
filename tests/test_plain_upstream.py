"""doqproxy.upstream.plain: shared sockets, replies matched by ID and question, the in-flight
cap (in-process, real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import dns.message
import dns.rrset

from doqproxy.dns import wire
from doqproxy.net.addresses import parse_upstream
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.plain import PlainUpstream, reply_key


def make(name: str) -> tuple[bytes, wire.Question]:
    message = dns.message.make_query(name, "A")
    message.id = 0
    data = message.to_wire()
    return data, wire.parse_question(data)


def test_reply_key_is_case_insensitive_and_needs_a_question() -> None:
    data, _ = make("WWW.Example.")
    response = dns.message.make_response(dns.message.from_wire(data)).to_wire()
    assert reply_key(response) == (0, b"\x03www\x07example\x00", 1)
    assert reply_key(response[:4] + b"\x00\x00" + response[6:12]) is None
    assert reply_key(b"\x00" * 5) is None


class Backend(asyncio.DatagramProtocol):
    """Answers each query twice: first for another question with the same ID (a spoof that
    guessed the ID), then properly; ``hold`` names get no answer at all."""

    def __init__(self, hold: str = "") -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: set[int] = set()
        self.hold = hold

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        query = dns.message.from_wire(data)
        self.sources.add(addr[1])
        name = query.question[0].name.to_text()
        if self.hold and name.startswith(self.hold):
            return
        spoof = dns.message.make_query("evil.example.", "A")
        spoof.id = query.id
        spoofed = dns.message.make_response(spoof)
        spoofed.answer.append(dns.rrset.from_text("evil.example.", 60, "IN", "A", "203.0.113.6"))
        self.transport.sendto(spoofed.to_wire(), addr)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.7"))
        self.transport.sendto(response.to_wire(), addr)


async def start_backend(backend: Backend) -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: backend, local_addr=("127.0.0.1", 0))
    return transport, transport.get_extra_info("sockname")[1]


async def test_many_queries_share_few_sockets_and_spoofs_are_ignored() -> None:
    backend = Backend()
    transport, port = await start_backend(backend)
    upstream = PlainUpstream(parse_upstream(f"udp://127.0.0.1:{port}", ("udp",)), sockets=4)
    try:
        queries = [make(f"n{n}.example.") for n in range(200)]
        replies = await asyncio.gather(*(upstream.query(data, q) for data, q in queries))
        for (_, question), reply in zip(queries, replies, strict=True):
            parsed = dns.message.from_wire(reply)
            assert parsed.id == 0
            assert parsed.question[0].name.to_text() == wire.name_text(question.qname)
            assert [rd.to_text() for rd in parsed.answer[0]] == ["192.0.2.7"]
        assert len(backend.sources) <= 4
        assert upstream.open_sockets <= 4
        assert upstream.ignored_replies == 200
    finally:
        await upstream.aclose()
        transport.close()


async def test_in_flight_cap_fails_at_once() -> None:
    backend = Backend(hold="slow")
    transport, port = await start_backend(backend)
    upstream = PlainUpstream(
        parse_upstream(f"udp://127.0.0.1:{port}", ("udp",)), max_in_flight=3, display_name="backend"
    )
    try:
        waiting = [
            asyncio.ensure_future(upstream.query(*make(f"slow{n}.example."))) for n in range(3)
        ]
        await asyncio.sleep(0.1)
        try:
            await asyncio.wait_for(upstream.query(*make("fast.example.")), 1)
            raise AssertionError("the fourth query was not refused")
        except UpstreamError as exc:
            assert "too many queries in flight" in str(exc)
            assert "127.0.0.1" not in str(exc)
        assert upstream.overloaded == 1
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert upstream.in_flight == 0
        reply = await asyncio.wait_for(upstream.query(*make("fast.example.")), 5)
        assert dns.message.from_wire(reply).answer
    finally:
        await upstream.aclose()
        transport.close()
