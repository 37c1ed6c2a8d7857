"""The pool's prepared first flight, in process against the aioquic test upstream."""

from __future__ import annotations

import asyncio

import dns.message
import pytest
from aioquic.quic.configuration import QuicConfiguration

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pool import DoqUpstream, PoolSettings
from doqproxy.upstream.tickets import TicketFile

from .conftest import SERVER_NAME, Certs
from .doq_fixture import DoqTestUpstream


async def ask(pool: DoqUpstream, name: str) -> dns.message.Message:
    data = dns.message.make_query(name, "A").to_wire()
    question = wire.parse_question(data)
    message = rewrite.upstream_query(data, question, pad_block=128)
    return dns.message.from_wire(await pool.query(message, question))


async def one_ticket(
    upstream: DoqTestUpstream, certs: Certs
) -> tuple[QuicConfiguration, UpstreamUrl, TicketFile]:
    """A ticket store holding exactly one session ticket for ``upstream``."""
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file)
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    tickets = TicketFile(None)
    first = DoqUpstream(url, configuration, PoolSettings(), tickets=tickets)
    assert (await ask(first, "a.test.")).answer
    for _ in range(100):
        if tickets.count(first._key):
            break
        await asyncio.sleep(0.02)
    await first.aclose()
    assert tickets.count(first._key) == 1
    return configuration, url, tickets


async def test_prepared_flight_is_used_rebuilt_when_old_and_returned_at_close(
    upstream: DoqTestUpstream, certs: Certs
) -> None:
    configuration, url, tickets = await one_ticket(upstream, certs)

    pool = DoqUpstream(url, configuration, PoolSettings(), tickets=tickets)
    await pool.prepare()
    prepared = pool._prepared
    assert prepared is not None and prepared.resumable
    assert tickets.count(pool._key) == 0  # the prepared flight holds the ticket
    # Too old: rebuilt with the same (unsent) ticket.
    prepared.info.opened_at -= 60
    await pool.prepare()
    assert pool._prepared is not None and pool._prepared is not prepared
    assert prepared.dead
    # The first query rides the prepared flight as accepted early data.
    assert (await ask(pool, "n1.test.")).answer
    assert upstream.state.seen[-1].early
    assert upstream.state.early_accepted == 1
    assert pool._prepared is None
    await pool.aclose()


async def test_nothing_prepared_without_a_ticket_or_with_0rtt_off(
    upstream: DoqTestUpstream, certs: Certs
) -> None:
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file)
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    pool = DoqUpstream(url, configuration, PoolSettings())
    await pool.prepare()
    assert pool._prepared is None
    off = DoqUpstream(url, configuration, PoolSettings(zero_rtt=False))
    await off.prepare()
    assert off._prepared is None
    await pool.aclose()
    await off.aclose()


async def test_query_during_preparation_waits_for_the_prepared_flight(
    upstream: DoqTestUpstream, certs: Certs
) -> None:
    configuration, url, tickets = await one_ticket(upstream, certs)

    pool = DoqUpstream(url, configuration, PoolSettings(), tickets=tickets)
    pool.start()  # the preparation runs in the background...
    for _ in range(20):  # ...has taken the ticket and is building the connection...
        if tickets.count(pool._key) == 0:
            break
        await asyncio.sleep(0)
    assert pool._preparing is not None and tickets.count(pool._key) == 0
    assert (await ask(pool, "n2.test.")).answer  # ...and the query must not race it
    assert upstream.state.seen[-1].early
    assert upstream.state.early_accepted == 1
    await pool.aclose()


async def test_socket_errors_become_upstream_errors_and_back_off(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from doqproxy.upstream.base import UpstreamError
    from doqproxy.upstream.doq_connection import DoqConnection

    async def unreachable(self: DoqConnection) -> None:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(DoqConnection, "open", unreachable)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file)
    pool = DoqUpstream(UpstreamUrl("quic", "127.0.0.1", 853), configuration, PoolSettings())
    with pytest.raises(UpstreamError, match="Network is unreachable"):
        await ask(pool, "a.test.")
    with pytest.raises(UpstreamError, match="next attempt in"):
        await ask(pool, "a.test.")
    await pool.aclose()
