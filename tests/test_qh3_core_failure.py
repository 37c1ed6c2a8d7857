"""When qh3's core fails to build packets, the connection ends at once and its queries
fail over, instead of some of them being lost until their timeout.

qh3 2.1.0 raises ``ValueError: reserved stream is missing`` from ``poll_transmit``
when a stream completes while a resend of its data (after a PTO) waits, already
reserved, for the congestion window (seen with 500 concurrent queries through the
forwarder on a loaded machine, ``DOQPROXY_QUIC_ENGINE=qh3``, tests/test_forward_e2e.py).
The queries in the packet it was building never reach the server. The failure is
injected here, so the test does not depend on the timing that provokes it."""

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

pytestmark = pytest.mark.skipif("qh3" not in engine.installed(), reason="qh3 is not installed")


class BrokenCore:
    """qh3's native core, except that building packets fails as qh3 2.1.0's can."""

    def __init__(self, core: Any) -> None:
        self._core = core

    failing = "poll_transmit"

    def poll_transmit(self, now: float) -> Any:
        if self.failing == "poll_transmit":
            raise ValueError("reserved stream is missing")
        return self._core.poll_transmit(now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def query(name: str) -> tuple[bytes, wire.Question]:
    data = dns.message.make_query(name, "A").to_wire()
    question = wire.parse_question(data)
    return rewrite.upstream_query(data, question, pad_block=128), question


@pytest.mark.parametrize("failing", ["poll_transmit", "receive"])
async def test_a_failed_core_ends_the_connection_and_the_query_fails_over(
    upstream: DoqTestUpstream, certs: Certs, failing: str
) -> None:
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file, quic_engine="qh3")
    pool = DoqUpstream(url, configuration, PoolSettings(quic_engine="qh3"))
    try:
        assert dns.message.from_wire(await pool.query(*query("n1.test."))).answer
        [first] = pool.connections
        quic = first.session.quic  # type: ignore[attr-defined]
        broken = BrokenCore(quic._core)
        broken.failing = failing
        quic._core = broken
        if failing == "receive":  # the answer's datagram is what the core chokes on

            def receive(*args: Any, **kwargs: Any) -> None:
                raise ValueError("reserved stream is missing")

            quic.receive_datagram = receive
            quic.receive_many_datagrams = receive  # the path once the handshake is confirmed
        async with asyncio.timeout(3):  # the query timeout is 5 s
            answer = await pool.query(*query("n2.test."))
        assert dns.message.from_wire(answer).answer
        assert first.dead
        assert first.info.close_reason == "QUIC engine error: reserved stream is missing"
        assert first not in pool.connections
        assert pool.stats.retries == 1
    finally:
        await pool.aclose()


async def test_a_core_failing_before_the_handshake_is_retried_on_a_new_connection(
    upstream: DoqTestUpstream, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: qh3 failed a new connection's first packets ("packet protection
    failed: missing OneRtt packet key") and the query got SERVFAIL at once, as if the
    server were unreachable. The engine, not the server, failed: try a new connection."""
    from doqproxy.upstream import engine_qh3

    made: list[Any] = []

    class FirstOneBroken(engine_qh3.ReservationSafeConnection):  # type: ignore[misc, unused-ignore]
        def _create_core(self, *args: Any, **kwargs: Any) -> None:
            super()._create_core(*args, **kwargs)
            if not made:  # only the first connection's core fails
                self._core = BrokenCore(self._core)
            made.append(self)

    monkeypatch.setattr(engine_qh3, "ReservationSafeConnection", FirstOneBroken)
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file, quic_engine="qh3")
    pool = DoqUpstream(url, configuration, PoolSettings(quic_engine="qh3"))
    try:
        async with asyncio.timeout(3):
            answer = await pool.query(*query("n1.test."))
        assert dns.message.from_wire(answer).answer
        assert len(made) == 2 and pool.stats.retries == 1
        assert upstream.state.handshakes == 1  # the broken one never reached the server
    finally:
        await pool.aclose()
