"""A DNS-over-TLS test server (RFC 7858) on asyncio's TLS, answering from the DoQ
fixture's zone. Queries on one connection are answered as they finish, so a slow
name (``slow.test.``, delayed ``slow_delay`` seconds) is overtaken by later ones:
the client must match answers by ID (RFC 7766 pipelining)."""

from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass, field

import dns.edns
import dns.message

from .doq_fixture import answer


@dataclass
class DotSeen:
    msg_id: int
    name: str
    padded: bool
    connection: int


@dataclass
class DotState:
    seen: list[DotSeen] = field(default_factory=list)
    connections: int = 0
    slow_delay: float = 1.0


class DotTestServer:
    """Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, cert_file: str, key_file: str, host: str = "127.0.0.1") -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self.host = host
        self.port = 0
        self.state = DotState()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def names(self) -> list[str]:
        return [seen.name for seen in self.state.seen]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.state.connections += 1
        number = self.state.connections
        self._writers.add(writer)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                wire = await reader.readexactly(length)
                task = asyncio.ensure_future(self._answer(wire, writer, number))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, wire: bytes, writer: asyncio.StreamWriter, number: int) -> None:
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text().lower()
        padded = any(option.otype == dns.edns.PADDING for option in query.options)
        self.state.seen.append(DotSeen(query.id, name, padded, number))
        if name == "slow.test.":
            await asyncio.sleep(self.state.slow_delay)
        response = answer(query).to_wire(max_size=65535)
        if not writer.is_closing():
            writer.write(struct.pack("!H", len(response)) + response)

    async def stop(self) -> None:
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
