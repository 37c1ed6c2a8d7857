"""Review: a pool retries a query and skips the connect backoff only when our own
QUIC engine failed (its reason starts with ``engine.ENGINE_FAILURE``). A server picks
its CONNECTION_CLOSE reason phrase freely, so one that closes every handshake with
"QUIC engine error: ..." must still be treated as the server's failure."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import pytest
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream import engine
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pool import DoqUpstream, PoolSettings

from .conftest import SERVER_NAME, Certs

HOSTILE = f"{engine.ENGINE_FAILURE}: said the server"


class _Hostile(QuicConnectionProtocol):
    """Closes each connection as soon as the client's first flight is read."""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ProtocolNegotiated):
            # A transport close: its reason phrase is kept in Initial and Handshake packets.
            self._quic.close(error_code=0x2, frame_type=0, reason_phrase=HOSTILE)
            self.transmit()


def _query(name: str) -> tuple[bytes, wire.Question]:
    data = dns.message.make_query(name, "A").to_wire()
    question = wire.parse_question(data)
    return rewrite.upstream_query(data, question, pad_block=128), question


@pytest.mark.parametrize("name", engine.installed())
async def test_a_server_close_that_says_engine_error_is_not_ours(certs: Certs, name: str) -> None:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
    configuration.load_cert_chain(certs.cert_file, certs.key_file)
    opened: list[int] = []

    def create_protocol(*args: Any, **kwargs: Any) -> _Hostile:
        opened.append(1)
        return _Hostile(*args, **kwargs)

    server = await serve(
        "127.0.0.1", 0, configuration=configuration, create_protocol=create_protocol
    )
    port = server._transport.get_extra_info("sockname")[1]
    url = UpstreamUrl("quic", "127.0.0.1", port)
    client = client_configuration(SERVER_NAME, ca_file=certs.ca_file, quic_engine=name)
    pool = DoqUpstream(url, client, PoolSettings(quic_engine=name, handshake_timeout=10))
    try:
        async with asyncio.timeout(20):
            with pytest.raises(UpstreamError) as failure:
                await pool.query(*_query("n1.test."))
        assert "said the server" in str(failure.value)
    finally:
        await pool.aclose()
        server.close()
    assert pool.stats.retries == 0
    assert len(opened) == 1
    assert pool._backoff.failures > 0  # the server's refusal costs a backoff
