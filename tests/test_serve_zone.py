"""``doqproxy serve --zone``: real DoQ clients get authoritative answers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rdatatype
import pytest

from .serve_helpers import (
    SERVER_NAME,
    ServeCerts,
    ServeProcess,
    client_configuration,
    open_raw,
    query,
    rcode_of,
    rdatas,
    serve_certs,
    start_serve,
    zone_file,
)

__all__ = ["serve_certs", "start_serve", "zone_file"]  # fixtures used by name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zone_server(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> ServeProcess:
    return start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file
    )


async def ask(
    server: ServeProcess, certs: ServeCerts, message: dns.message.Message
) -> dns.message.Message:
    return await dns.asyncquery.quic(
        message,
        "127.0.0.1",
        port=server.port,
        timeout=5.0,
        verify=certs.ca_file,
        server_hostname=SERVER_NAME,
    )


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig (knot-dnsutils) not installed")
def test_kdig_gets_the_zone_answer(zone_server: ServeProcess, serve_certs: ServeCerts) -> None:
    result = subprocess.run(
        [
            "kdig", "@127.0.0.1", "-p", str(zone_server.port),
            f"+tls-ca={serve_certs.ca_file}", f"+tls-hostname={SERVER_NAME}", "+quic",
            "www.example.test", "A",
        ],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "QUIC session" in result.stdout
    assert "status: NOERROR" in result.stdout
    assert "Flags: qr aa" in result.stdout
    assert "192.0.2.80" in result.stdout
    # kdig pads DoQ queries (RFC 8467), so the whole response is 468 octets.
    assert "Received 468 B" in result.stdout


async def test_dnspython_answers(zone_server: ServeProcess, serve_certs: ServeCerts) -> None:
    answer = await ask(zone_server, serve_certs, query("www.example.test", "AAAA"))
    assert rcode_of(answer) == "NOERROR"
    assert answer.flags & dns.flags.AA
    assert rdatas(answer, "AAAA") == ["2001:db8::80"]

    alias = await ask(zone_server, serve_certs, query("ALIAS.example.test", "A"))
    assert [rrset.rdtype for rrset in alias.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert rdatas(alias) == ["192.0.2.80"]
    assert alias.question[0].name.to_text() == "ALIAS.example.test."

    wild = await ask(zone_server, serve_certs, query("anything.wild.example.test", "A"))
    assert rdatas(wild) == ["192.0.2.99"]
    assert wild.answer[0].name.to_text() == "anything.wild.example.test."


async def test_nxdomain_and_nodata_carry_the_soa(
    zone_server: ServeProcess, serve_certs: ServeCerts
) -> None:
    missing = await ask(zone_server, serve_certs, query("nope.example.test", "A"))
    assert rcode_of(missing) == "NXDOMAIN"
    assert missing.flags & dns.flags.AA
    assert [rrset.rdtype for rrset in missing.authority] == [dns.rdatatype.SOA]
    assert missing.authority[0].ttl == 60  # min(SOA TTL, MINIMUM), RFC 2308

    nodata = await ask(zone_server, serve_certs, query("www.example.test", "MX"))
    assert rcode_of(nodata) == "NOERROR"
    assert nodata.answer == []
    assert [rrset.rdtype for rrset in nodata.authority] == [dns.rdatatype.SOA]

    # b.c.example.test only has a descendant: an empty non-terminal, NODATA (RFC 8020).
    empty = await ask(zone_server, serve_certs, query("b.c.example.test", "A"))
    assert rcode_of(empty) == "NOERROR"
    assert [rrset.rdtype for rrset in empty.authority] == [dns.rdatatype.SOA]


async def test_outside_the_zone_is_refused(
    zone_server: ServeProcess, serve_certs: ServeCerts
) -> None:
    answer = await ask(zone_server, serve_certs, query("www.example.org", "A"))
    assert rcode_of(answer) == "REFUSED"
    assert not answer.flags & dns.flags.AA


async def test_padded_query_gets_a_padded_response(
    zone_server: ServeProcess, serve_certs: ServeCerts
) -> None:
    connection = await open_raw(zone_server.port, client_configuration(serve_certs.ca_file))
    try:
        padded = query("www.example.test", "A", use_edns=0, pad=128)
        wire = await connection.client.answer(connection.client.send_query(padded))
        assert len(wire) % 468 == 0
        assert rdatas(dns.message.from_wire(wire)) == ["192.0.2.80"]

        plain = query("www.example.test", "A", use_edns=0)
        wire = await connection.client.answer(connection.client.send_query(plain))
        reply = dns.message.from_wire(wire)
        assert not any(option.otype == dns.edns.PADDING for option in reply.options)
        assert len(wire) % 468 != 0
    finally:
        connection.close()


async def test_notify_is_not_implemented_by_the_zone(
    zone_server: ServeProcess, serve_certs: ServeCerts
) -> None:
    notify = query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    answer = await ask(zone_server, serve_certs, notify)
    assert rcode_of(answer) == "NOTIMP"
