"""In-process fakes for the cache tests: a clock and an upstream built on dnspython."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from doqproxy.dns import rewrite, wire
from doqproxy.dns.wire import Question
from doqproxy.upstream.base import UpstreamError

SOA_TEXT = "ns.example. hostmaster.example. 1 7200 900 1209600 300"


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Zone = Callable[[dns.message.Message, dns.message.Message], None]
"""Fills in the answer (a ``make_response`` of the query)."""


def answer_a(*addresses: str, ttl: int = 300) -> Zone:
    def fill(query: dns.message.Message, response: dns.message.Message) -> None:
        q = query.question[0]
        if q.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(q.name, ttl, "IN", "A", *addresses))
        else:
            soa = dns.rrset.from_text("example.", ttl, "IN", "SOA", SOA_TEXT)
            response.authority.append(soa)

    return fill


def nxdomain(soa_ttl: int = 600, minimum: int = 300, *, with_soa: bool = True) -> Zone:
    def fill(query: dns.message.Message, response: dns.message.Message) -> None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        if with_soa:
            text = f"ns.example. hostmaster.example. 1 7200 900 1209600 {minimum}"
            response.authority.append(dns.rrset.from_text("example.", soa_ttl, "IN", "SOA", text))

    return fill


def nodata(soa_ttl: int = 600, minimum: int = 300, *, with_soa: bool = True) -> Zone:
    def fill(query: dns.message.Message, response: dns.message.Message) -> None:
        if with_soa:
            text = f"ns.example. hostmaster.example. 1 7200 900 1209600 {minimum}"
            response.authority.append(dns.rrset.from_text("example.", soa_ttl, "IN", "SOA", text))

    return fill


def rcode_only(rcode: dns.rcode.Rcode) -> Zone:
    def fill(query: dns.message.Message, response: dns.message.Message) -> None:
        response.set_rcode(rcode)
        if rcode == dns.rcode.NOERROR:
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "192.0.2.9")
            )

    return fill


class FakeUpstream:
    """Answers from a :data:`Zone` function; counts queries; can fail or be held."""

    name = "fake://upstream"
    pad_block: int | None = None

    def __init__(self, zone: Zone | None = None) -> None:
        self.zone = zone or answer_a("192.0.2.1")
        self.calls: list[Question] = []
        self.fail: UpstreamError | None = None
        self.gate: asyncio.Event | None = None
        """When set, queries wait for the event before answering."""
        self.mangle: Callable[[bytes], bytes] | None = None

    async def query(self, message: bytes, question: Question) -> bytes:
        self.calls.append(question)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        assert wire.get_id(message) == 0
        wire_response = upstream_answer(self.zone, message)
        if self.mangle is not None:
            wire_response = self.mangle(wire_response)
        return wire_response

    async def aclose(self) -> None:
        pass


def make_query(
    name: str,
    rdtype: str = "A",
    *,
    msg_id: int = 4321,
    edns: bool = True,
    payload: int = 1232,
    do: bool = False,
    cd: bool = False,
    rd: bool = True,
) -> bytes:
    """A query in wire form; ``name`` is kept exactly as spelled (0x20)."""
    q = dns.message.make_query(
        dns.name.from_text(name),
        rdtype,
        use_edns=0 if edns else False,
        payload=payload,
        want_dnssec=do,
    )
    q.id = msg_id
    if cd:
        q.flags |= dns.flags.CD
    if not rd:
        q.flags &= ~dns.flags.RD
    return q.to_wire()


def ttls(reply: bytes) -> list[int]:
    """Every record TTL in a reply, in section order (OPT excluded)."""
    message = dns.message.from_wire(reply)
    return [rrset.ttl for section in message.sections[1:] for rrset in section]


def ede_codes(reply: bytes) -> list[int]:
    message = dns.message.from_wire(reply)
    return [opt.code for opt in message.options if isinstance(opt, dns.edns.EDEOption)]


def fresh_reply(response: bytes, query: bytes, *, udp: bool) -> bytes:
    """What the no-cache path makes of ``response`` for ``query``."""
    question = wire.parse_question(query)
    parsed = rewrite.check_response(response, question)
    return rewrite.client_reply(response, parsed, question, udp=udp)


def upstream_answer(zone: Zone, query: bytes) -> bytes:
    """The response the fake upstream gives for ``query`` (ID 0), synchronously."""
    message = dns.message.from_wire(query)
    message.id = 0
    response = dns.message.make_response(message)
    if message.ednsflags & dns.flags.DO:
        response.want_dnssec(True)  # a validating upstream echoes DO
    response.flags |= message.flags & dns.flags.CD  # and CD (RFC 6840 §5.9)
    zone(message, response)
    return response.to_wire()
