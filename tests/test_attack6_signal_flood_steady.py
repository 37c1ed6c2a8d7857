"""SIGHUP and SIGUSR1 floods while ``doqproxy forward`` (qh3 engine) answers a stream of
queries through a DoQ upstream (attack session 6): every query is answered, the
process survives the flood and then exits 0 on SIGTERM, with no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

import dns.message
import dns.rcode

from .conftest import Certs
from .doq_fixture import DoqTestUpstream


async def test_signal_flood_while_answering(certs: Certs, start_proxy) -> None:  # type: ignore[no-untyped-def]
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file)
    await upstream.start()
    try:
        proxy = await asyncio.to_thread(start_proxy, upstream.port)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        got: dict[int, int] = {}
        all_in = asyncio.Event()

        async def receive() -> None:
            while True:
                reply = dns.message.from_wire(await loop.sock_recv(client, 65535))
                got[reply.id] = reply.rcode()
                if len(got) == 300:
                    all_in.set()

        receiver = asyncio.ensure_future(receive())
        for i in range(300):
            query = dns.message.make_query(f"n{i % 64}.test.", "A")
            query.id = i
            await loop.sock_sendto(client, query.to_wire(), ("127.0.0.1", proxy.port))
            proxy.proc.send_signal(signal.SIGHUP if i % 2 else signal.SIGUSR1)
            await asyncio.sleep(0.005)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 60)
        receiver.cancel()
        client.close()
        log = proxy.stderr()
        assert proxy.proc.poll() is None, log[-3000:]
        assert sorted(set(range(300)) - set(got)) == [], log[-3000:]
        assert set(got.values()) == {dns.rcode.NOERROR}, log[-3000:]
        proxy.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.proc.wait, 30) == 0, log[-3000:]
        log = proxy.stderr()
        assert "Traceback" not in log, log
        assert log.count("SIGHUP: reloading") <= 150, log.count("SIGHUP: reloading")
    finally:
        await upstream.stop()
