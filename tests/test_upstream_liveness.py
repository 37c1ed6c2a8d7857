"""Connection liveness is judged at the QUIC level: a server that acknowledges our packets
is alive however long it thinks, and one that stops acknowledging is dead."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.asyncquery
import dns.message
import dns.rcode

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]


async def ask(proxy: ProxyProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=20)


async def wait_seen(upstream: DoqTestUpstream, name: str, count: int) -> None:
    for _ in range(500):
        if upstream.seen_names().count(name) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} not seen {count} times: {upstream.seen_names()}")


async def crash_and_restart(upstream: DoqTestUpstream) -> None:
    """The server process dies without a word and comes back on the same port: the old
    connection's packets are then dropped silently (unknown connection IDs)."""
    server = upstream.server
    assert server is not None
    server._transport.close()  # no CONNECTION_CLOSE: a crash, not a shutdown
    upstream.server = None
    await asyncio.sleep(0.1)
    await upstream.start()


async def test_slow_answers_do_not_kill_a_healthy_connection(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 3.0
    proxy = start_proxy(upstream.port, "--timeout", "8")
    assert (await ask(proxy, "a.test.")).answer
    replies = await asyncio.gather(*(ask(proxy, "slow.test.", t) for t in ("A", "AAAA")))
    assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies), proxy.stderr()
    assert replies[0].answer
    # Each asked once, on the one connection: no watchdog close, no retry.
    assert upstream.seen_names().count("slow.test.") == 2
    assert upstream.state.handshakes == 1
    assert upstream.state.close_codes == []


async def test_server_vanishing_during_a_slow_answer_is_noticed(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 1.5
    proxy = start_proxy(upstream.port, "--timeout", "9")
    assert (await ask(proxy, "a.test.")).answer
    slow = asyncio.ensure_future(ask(proxy, "slow.test."))
    await wait_seen(upstream, "slow.test.", 1)
    await crash_and_restart(upstream)
    # The old connection stops acknowledging; the query is retried on a new one.
    reply = await slow
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer, proxy.stderr()
    assert upstream.seen_names().count("slow.test.") == 2
    assert upstream.state.handshakes == 2
