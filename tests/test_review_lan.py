"""Review findings in the LAN front ends (in-process, real sockets on 127.0.0.0/8)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from doqproxy.frontend.access import AccessList
from doqproxy.frontend.admission import AccessSettings, Admission, minimal_any_reply
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.tcp import TcpFrontEnd, TcpLimits
from doqproxy.net.addresses import parse_upstream
from doqproxy.resolver import Resolver
from doqproxy.routing.local_zones import LocalZones
from doqproxy.upstream.plain import PlainUpstream


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dns.message.Message:
    data = dns.message.make_query("localhost.", "A").to_wire()
    writer.write(struct.pack("!H", len(data)) + data)
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
    return dns.message.from_wire(await reader.readexactly(length))


async def test_clients_outside_the_access_list_take_no_tcp_slot() -> None:
    """A client the access list refuses used to take a TCP slot like any other: a few
    connections that send one octet and stall (5 s each, then again) held every slot,
    and allowed clients were refused. Now they get REFUSED without a slot."""
    settings = AccessSettings(allow=("127.0.0.2/32",))
    access = AccessList((ipaddress.ip_network("127.0.0.2/32"),))
    admission = Admission(settings, access, reaches_lan=False)
    upstream = PlainUpstream(parse_upstream("udp://127.0.0.1:9", ("udp",)))
    resolver = Resolver(upstream, local=LocalZones())
    limits = TcpLimits(max_connections=8, max_connections_per_ip=8, max_connections_per_prefix=8)
    front = TcpFrontEnd(resolver, InFlight(), limits, admission)
    server = await asyncio.start_server(front.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stalled = []
    try:
        outsider = await _connect(port, "127.0.0.1")
        assert (await _ask(*outsider)).rcode() == dns.rcode.REFUSED
        outsider[1].close()
        for _ in range(8):  # one octet of a message, then nothing: never idle
            _reader, writer = await _connect(port, "127.0.0.1")
            writer.write(b"\x00")
            await writer.drain()
            stalled.append(writer)
        await asyncio.sleep(0.3)
        insider = await _connect(port, "127.0.0.2")
        reply = await _ask(*insider)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["127.0.0.1"]
        insider[1].close()
    finally:
        for writer in stalled:
            writer.close()
        server.close()
        front.close_all()
        await upstream.aclose()


def test_minimal_any_answer_to_class_any_is_a_valid_record() -> None:
    """RFC 8482 answer to ``ANY ANY``: the synthesized HINFO carried class ANY (255),
    which only a question may have; it is class IN now."""
    query = dns.message.make_query("example.com.", "ANY", rdclass="ANY")
    reply = minimal_any_reply(query.to_wire())
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert query.is_response(parsed)
    (rrset,) = parsed.answer
    assert rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == dns.rdatatype.HINFO
