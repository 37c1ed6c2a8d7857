"""Routes and locally served names, end to end: a real ``doqproxy forward`` process,
the DoQ test upstream for the default route and a plain DNS fixture for a routed
domain. Both fixtures record every query, so "never reached an upstream" is checked
where it matters: on the upstream side."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename

from .conftest import ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .serve_helpers import PlainDnsServer, rcode_of, rdatas


async def _ask(port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)


def _names(plain: PlainDnsServer) -> list[str]:
    return [name for _, _, name in plain.state.seen]


async def test_routes_local_zones_and_overrides(
    upstream: DoqTestUpstream, start_proxy: object, tmp_path: Path
) -> None:
    query_log = tmp_path / "queries.jsonl"
    plain = PlainDnsServer()
    await plain.start()
    try:
        at = f"udp://127.0.0.1:{plain.port}"
        proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
            upstream.port,
            "--route", f"plain.test,corp.test={at}",
            "--route", f"eu.plain.test=quic://127.0.0.1:{upstream.port}",
            "--route", f"5.168.192.in-addr.arpa={at}",
            "--query-log", str(query_log),
        )  # fmt: skip
        port = proxy.port

        # The routed domain goes to the plain server, unpadded, and not to DoQ.
        reply = await _ask(port, "host.corp.plain.test")
        assert rdatas(reply) == ["198.51.100.7"]
        assert _names(plain) == ["host.corp.plain.test."]
        assert plain.state.padded == [False]
        assert "host.corp.plain.test." not in upstream.seen_names()

        await _ask(port, "host.corp.test")  # the fixture refuses it, but it went there
        assert _names(plain)[-1] == "host.corp.test."
        assert "host.corp.test." not in upstream.seen_names()

        # Everything else goes over DoQ, padded as before.
        reply = await _ask(port, "a.test")
        assert rdatas(reply) == ["192.0.2.1"]
        assert upstream.seen_names()[-1] == "a.test."
        assert "a.test." not in _names(plain)

        # The longest suffix wins: eu.plain.test is routed back to DoQ.
        reply = await _ask(port, "x.eu.plain.test")
        assert rcode_of(reply) == "NXDOMAIN"
        assert upstream.seen_names()[-1] == "x.eu.plain.test."
        assert "x.eu.plain.test." not in _names(plain)

        # Private reverse zones and localhost are answered here, with an SOA.
        before_doq, before_plain = len(upstream.state.seen), len(plain.state.seen)
        ptr = dns.reversename.from_address("192.168.1.10").to_text()
        reply = await _ask(port, ptr, "PTR")
        assert rcode_of(reply) == "NXDOMAIN"
        assert reply.authority[0].rdtype == dns.rdatatype.SOA
        assert reply.authority[0].name.to_text() == "168.192.in-addr.arpa."
        dig = await asyncio.create_subprocess_exec(
            "dig", "+short", "+tries=1", "+time=5", "-p", str(port), "@127.0.0.1", "localhost",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(dig.communicate(), 30)
        assert out.decode().split() == ["127.0.0.1"]
        reply = await _ask(port, "printer.local")
        assert rcode_of(reply) == "NXDOMAIN"
        await asyncio.sleep(0.2)
        assert len(upstream.state.seen) == before_doq
        assert len(plain.state.seen) == before_plain

        # A route overrides a local zone.
        override = dns.reversename.from_address("192.168.5.7").to_text()
        await _ask(port, override, "PTR")
        assert _names(plain)[-1] == override
        assert override not in upstream.seen_names()

        # The query log says who answered each.
        proxy.stop()
        by_name = {}
        for line in query_log.read_text().splitlines():
            entry = json.loads(line)
            by_name[entry["qname"].lower()] = entry["upstream"]
        assert by_name["host.corp.plain.test."] == at
        assert by_name["a.test."] == f"quic://127.0.0.1:{upstream.port}"
        assert by_name["x.eu.plain.test."] == f"quic://127.0.0.1:{upstream.port}"
        assert by_name["localhost."] == "local"
        assert by_name[ptr.lower()] == "local"
    finally:
        await plain.stop()


async def test_route_with_several_upstreams_steps_around_a_dead_one(
    upstream: DoqTestUpstream, start_proxy: object
) -> None:
    plain = PlainDnsServer()
    await plain.start()
    try:
        dead = f"udp://127.0.0.1:{free_port()}"  # nothing there: ICMP port unreachable
        proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
            upstream.port,
            "--route", f"plain.test={dead},udp://127.0.0.1:{plain.port}",
            "--upstream-strategy", "failover",
        )  # fmt: skip
        for index in range(3):
            reply = await _ask(proxy.port, f"h{index}.plain.test")
            assert rdatas(reply) == ["198.51.100.7"]
        assert _names(plain) == [f"h{i}.plain.test." for i in range(3)]
    finally:
        await plain.stop()


async def test_no_local_zones_forwards_them(upstream: DoqTestUpstream, start_proxy: object) -> None:
    proxy: ProxyProcess = start_proxy(upstream.port, "--no-local-zones")  # type: ignore[operator]
    ptr = dns.reversename.from_address("192.168.1.10").to_text()
    await _ask(proxy.port, ptr, "PTR")
    assert ptr in upstream.seen_names()
