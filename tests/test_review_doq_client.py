"""Review finding in the DoQ client's stream credit (a real ``doqproxy serve`` with a
stream limit of 1 in front of a slow plain DNS server, on loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.message

from doqproxy.dns import wire
from doqproxy.upstream.doq_connection import DoqConnection, client_configuration

from .serve_helpers import ServeCerts, ServeProcess, serve_certs, start_serve  # noqa: F401
from .slow_dns import SlowDnsServer


def query(name: str) -> bytes:
    message = dns.message.make_query(name, "A")
    message.id = 0
    return message.to_wire()


async def test_a_query_cancelled_as_credit_arrives_passes_the_credit_on(
    start_serve: Callable[..., ServeProcess],  # noqa: F811
    serve_certs: ServeCerts,  # noqa: F811
) -> None:
    """Two queries wait for stream credit; the server grants one stream and the query
    woken for it is cancelled before it runs. It used to take the wake-up with it: the
    other query waited for credit that had arrived, until its caller gave up."""
    slow = SlowDnsServer(delay=0.5)
    await slow.start()
    server = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
        "-u", slow.url, "--max-streams", "1", "--timeout", "10",
    )  # fmt: skip
    tasks: list[asyncio.Task[bytes]] = []

    def on_credit(_: DoqConnection) -> None:
        # Runs right after the waiters were woken: cancel the first one woken.
        if len(tasks) == 3 and not tasks[1].done():
            tasks[1].cancel()

    configuration = client_configuration("serve.doq.test", ca_file=serve_certs.ca_file)
    conn = DoqConnection(("127.0.0.1", server.port), configuration, on_credit=on_credit)
    await conn.open()
    try:
        tasks.append(asyncio.ensure_future(conn.query(query("first.test."), early=False)))
        await asyncio.wait_for(asyncio.shield(conn.handshake_done), 10)
        await asyncio.sleep(0.1)  # the first query takes the only stream
        assert len(conn._pending) == 1
        for name in ("woken.test.", "waiting.test."):  # no credit now: both wait
            tasks.append(asyncio.ensure_future(conn.query(query(name), early=False)))
        await asyncio.sleep(0.1)
        assert len(conn._pending) == 1 and conn.in_flight == 3
        first = await asyncio.wait_for(tasks[0], 10)
        assert wire.get_rcode(first) == 0
        answer = await asyncio.wait_for(tasks[2], 5)
        assert dns.message.from_wire(answer).question[0].name.to_text() == "waiting.test."
        assert tasks[1].cancelled()
    finally:
        for task in tasks:
            task.cancel()
        conn.close()
        await conn.wait_closed()
        await slow.stop()
