"""SPKI pins on a DoQ upstream, through the engine session: a matching pin connects,
a wrong one fails the handshake with a pin-mismatch error (and never answers)."""

from __future__ import annotations

import dns.message
import pytest

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pins import spki_sha256
from doqproxy.upstream.pool import DoqUpstream, PoolSettings

from .conftest import SERVER_NAME, Certs
from .doq_fixture import DoqTestUpstream


def _pin(cert_file: str) -> str:
    from cryptography import x509

    with open(cert_file, "rb") as handle:
        return spki_sha256(x509.load_pem_x509_certificate(handle.read()))


async def ask(pool: DoqUpstream) -> dns.message.Message:
    data = dns.message.make_query("a.test.", "A").to_wire()
    question = wire.parse_question(data)
    message = rewrite.upstream_query(data, question, pad_block=128)
    return dns.message.from_wire(await pool.query(message, question))


async def test_doq_pins(upstream: DoqTestUpstream, certs: Certs) -> None:
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file)
    good = DoqUpstream(url, configuration, PoolSettings(), pins=(_pin(certs.cert_file),))
    assert (await ask(good)).answer
    await good.aclose()
    wrong = "A" * 43 + "="
    bad = DoqUpstream(url, configuration, PoolSettings(), pins=(wrong,))
    with pytest.raises(UpstreamError, match="pin mismatch"):
        await ask(bad)
    await bad.aclose()
    assert len(upstream.seen_names()) == 1  # the pinned-out connection asked nothing
