"""Review findings in routes, local zones and their reload: each test failed before its fix."""

from __future__ import annotations

import asyncio
import dataclasses

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from click.testing import CliRunner

from doqproxy.cli import main
from doqproxy.dns import wire
from doqproxy.forwarder import Routes
from doqproxy.net.addresses import HostPort, parse_upstream
from doqproxy.resolver import Resolver
from doqproxy.routing.local_zones import LocalZones
from doqproxy.routing.routes import RouteError, RouteSpec, RoutingSettings, parse_route
from doqproxy.settings import ForwardSettings
from doqproxy.upstream.plain import PlainUpstream
from doqproxy.upstream.spec import parse_spec


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = dns.message.make_response(dns.message.from_wire(data))
        self.transport.sendto(reply.to_wire(), addr)


async def test_reload_closes_the_upstream_of_a_route_that_is_gone() -> None:
    """A reload that keeps the bootstrap, pins and TLS settings copied every upstream
    the old routes made into the new builder, so one no route uses any more was
    never closed: its sockets (a DoQ pool: connections and upkeep) lived forever."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    route = RouteSpec(("corp.test.",), (f"udp://127.0.0.1:{port}",))
    settings = ForwardSettings(
        listen=(HostPort("127.0.0.1", 53),),
        upstreams=(parse_spec("quic://127.0.0.1:853"),),
        timeout=0.2,
        routing=RoutingSettings(routes=(route,)),
    )
    default = PlainUpstream(parse_upstream("udp://127.0.0.1:9", ("udp",)))
    routes = Routes(Resolver(default), tickets=None)  # type: ignore[arg-type]
    try:
        routed = routes.apply(settings, default)
        data = dns.message.make_query("a.corp.test", "A").to_wire()
        await routed.query(wire.set_id(data, 0), wire.parse_question(data))
        assert routes.builder is not None
        (plain,) = routes.builder.made.values()
        assert isinstance(plain, PlainUpstream) and plain.open_sockets == 1
        routes.apply(dataclasses.replace(settings, routing=RoutingSettings()), default)
        await asyncio.sleep(1.0)  # the grace is the query timeout, 0.2 s
        assert plain.open_sockets == 0
        assert not routes.builder.made
    finally:
        await routes.aclose()
        transport.close()


def test_an_empty_non_terminal_above_a_local_record_is_nodata_not_nxdomain() -> None:
    """0.0.127.in-addr.arpa has a name below it (1.0.0.127.in-addr.arpa PTR localhost):
    NXDOMAIN there tells an RFC 8020 resolver that the PTR of 127.0.0.1 does not exist."""
    zones = LocalZones()
    for name in ("0.127.in-addr.arpa.", "0.0.127.in-addr.arpa.", "0.0.127.IN-ADDR.arpa."):
        query = dns.message.make_query(name, "PTR")
        data = query.to_wire()
        reply = zones.reply(wire.parse_question(data))
        assert reply is not None
        parsed = dns.message.from_wire(reply)
        assert parsed.rcode() == dns.rcode.NOERROR, name
        assert not parsed.answer and parsed.authority[0].rdtype == dns.rdatatype.SOA
    data = dns.message.make_query("2.0.0.127.in-addr.arpa.", "PTR").to_wire()
    reply = zones.reply(wire.parse_question(data))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN


def test_a_route_domain_idna_cannot_encode_is_a_one_line_error() -> None:
    """``--route ééé…(70).example=…`` raised UnicodeError from the idna codec: a
    traceback from forward and check-config instead of a one-line error."""
    with pytest.raises(RouteError, match="not a valid"):
        parse_route("é" * 70 + ".example=udp://127.0.0.1")
    result = CliRunner().invoke(
        main,
        ["check-config", "--config", "/dev/null"],
        env={
            "DOQPROXY_UPSTREAM": "quic://127.0.0.1",
            "DOQPROXY_ROUTE": "é" * 70 + ".x=udp://127.0.0.1",
        },
    )
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "not a valid" in result.output
