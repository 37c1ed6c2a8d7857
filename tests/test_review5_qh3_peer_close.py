"""Review: a server's CONNECTION_CLOSE ends the connection when it arrives, on both
engines. qh3's wrapper never enters a closing or draining state (its ``_state`` goes
from CONNECTED to TERMINATED only after the draining period, 3 PTOs), so the qh3
engine's "peer closed" check never matched: the connection stayed in the pool, taking
queries, until the close surfaced as an event (about 150 ms on loopback, 3 PTOs
on any path; aioquic: at once)."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import pytest

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream import engine
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pool import DoqUpstream, PoolSettings

from .conftest import SERVER_NAME, Certs
from .doq_fixture import DoqTestUpstream


def _query(name: str) -> tuple[bytes, wire.Question]:
    data = dns.message.make_query(name, "A").to_wire()
    question = wire.parse_question(data)
    return rewrite.upstream_query(data, question, pad_block=128), question


@pytest.mark.parametrize("name", engine.installed())
async def test_a_server_close_ends_the_connection_as_it_arrives(
    upstream: DoqTestUpstream, certs: Certs, name: str
) -> None:
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file, quic_engine=name)
    pool = DoqUpstream(url, configuration, PoolSettings(quic_engine=name))
    try:
        assert dns.message.from_wire(await pool.query(*_query("n1.test."))).answer
        [conn] = pool.connections
        seen: list[bool] = []
        ended = asyncio.Event()
        report = conn.on_terminated

        def on_terminated(*args: Any, draining: bool, **kwargs: Any) -> None:
            seen.append(draining)
            report(*args, draining=draining, **kwargs)
            ended.set()

        conn.on_terminated = on_terminated  # type: ignore[method-assign]
        upstream.close_all_connections(0)
        async with asyncio.timeout(10):
            await ended.wait()
        # Seen in the datagram that carried the close, not after the draining period.
        assert seen[:1] == [True]
        assert conn.info.close_by_peer
        assert conn not in pool.connections
    finally:
        await pool.aclose()
