"""A plain DNS server (UDP and TCP, loopback) that answers every query after a delay.

For tests of slow upstreams: ``doqproxy serve -u udp://...`` in front of it makes a
DoQ server with any think time. The delay can be changed while it runs.

    server = SlowDnsServer(delay=2.0)
    await server.start()          # server.port, server.host
    ...
    server.delay = 0.0
    await server.stop()
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

import dns.flags
import dns.message
import dns.rdatatype
import dns.rrset

ANSWERS = {dns.rdatatype.A: "192.0.2.1", dns.rdatatype.AAAA: "2001:db8::1"}


def slow_answer(wire: bytes) -> bytes | None:
    """The answer to ``wire``: A 192.0.2.1 or AAAA 2001:db8::1 for any name, else NODATA."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    if query.question:
        question = query.question[0]
        address = ANSWERS.get(question.rdtype)
        if address is not None:
            rdtype = dns.rdatatype.to_text(question.rdtype)
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, address))
    return response.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SlowDnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.queries += 1
        task = asyncio.ensure_future(self._reply(data, addr))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        await asyncio.sleep(self.server.delay)
        reply = slow_answer(data)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class SlowDnsServer:
    """Answers over UDP and TCP on ``host`` after ``delay`` seconds; counts the queries."""

    def __init__(self, delay: float = 1.0, host: str = "127.0.0.1") -> None:
        self.delay = delay
        self.host = host
        self.port = 0
        self.queries = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(self._serve_tcp, self.host, 0)
        self.port = self._tcp.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(self.host, self.port)
        )
        self._udp = transport

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                self.queries += 1
                await asyncio.sleep(self.delay)
                reply = slow_answer(data)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp://{host}:{self.port}"

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
