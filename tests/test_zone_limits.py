"""``serve --zone`` with an answer too large for one DNS message, and queries that carry
records: a clean error reply each time, never a traceback in the log."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest

from .serve_helpers import SERVER_NAME, ServeCerts, ServeProcess, serve_certs, start_serve

__all__ = ["serve_certs", "start_serve"]  # fixtures used by name

pytestmark = pytest.mark.slow

ZONE = """$ORIGIN huge.test.
$TTL 300
@ IN SOA ns hostmaster 1 7200 3600 1209600 60
@ IN NS ns
ns IN A 192.0.2.53
small IN A 192.0.2.1
"""


@pytest.fixture
def huge_zone(tmp_path: Path) -> str:
    # 300 TXT records of 250 octets: about 77 KB, more than one DNS message holds.
    lines = [f'big IN TXT "{i:03d}{"x" * 247}"' for i in range(300)]
    path = tmp_path / "huge.test.zone"
    path.write_text(ZONE + "\n".join(lines) + "\n")
    return str(path)


async def _ask(server: ServeProcess, certs: ServeCerts, wire_query: bytes) -> dns.message.Message:
    return await dns.asyncquery.quic(
        dns.message.from_wire(wire_query),
        "127.0.0.1",
        port=server.port,
        timeout=10.0,
        verify=certs.ca_file,
        server_hostname=SERVER_NAME,
    )


async def test_oversized_answer_is_servfail_with_ede(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, huge_zone: str
) -> None:
    server = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", huge_zone
    )
    query = dns.message.make_query("big.huge.test.", "TXT", use_edns=0)
    query.id = 0
    response = await _ask(server, serve_certs, query.to_wire())
    assert response.rcode() == dns.rcode.SERVFAIL
    texts = [opt.text for opt in response.options if isinstance(opt, dns.edns.EDEOption)]
    assert texts and "65535" in (texts[0] or "")
    small = dns.message.make_query("small.huge.test.", "A")
    small.id = 0
    assert (await _ask(server, serve_certs, small.to_wire())).answer
    assert "Traceback" not in server.stderr()


async def test_query_with_answer_records_is_formerr(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, huge_zone: str
) -> None:
    server = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", huge_zone
    )
    query = dns.message.make_query("small.huge.test.", "A")
    query.id = 0
    data = bytearray(query.to_wire())
    record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x63"
    struct.pack_into("!H", data, 6, 1)  # ANCOUNT = 1
    response = await _ask(server, serve_certs, bytes(data) + record)
    assert response.rcode() == dns.rcode.FORMERR
    assert "Traceback" not in server.stderr()
