"""The plain DNS over TCP front end (RFC 1035 §4.2.2, RFC 7766).

Each message carries a 2-octet length prefix. Queries pipelined on one
connection are answered concurrently, in the order they complete. The idle
timer runs only while nothing is in flight and is reset only by complete
messages; once a message has started, the rest of it must arrive within a
per-message deadline, so a slow sender cannot hold a connection open.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from dataclasses import dataclass

from doqproxy.dns import wire
from doqproxy.frontend.inflight import InFlight
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class TcpLimits:
    idle_timeout: float = 10.0
    """Seconds a connection may sit with nothing in flight (RFC 7766 §6.2.3)."""
    message_timeout: float = 5.0
    """Seconds a started message may take to arrive completely."""
    max_connections: int = 256
    max_connections_per_ip: int = 32
    max_pipelined: int = 100
    """Queries in flight on one connection before we stop reading from it."""


class TcpFrontEnd:
    """Accepts TCP connections and serves each in its own task."""

    def __init__(self, resolver: Resolver, inflight: InFlight, limits: TcpLimits) -> None:
        self.resolver = resolver
        self.inflight = inflight
        self.limits = limits
        self.connections = 0
        self.per_ip: Counter[str] = Counter()
        self.refused = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        limits = self.limits
        if (
            self.connections >= limits.max_connections
            or self.per_ip[ip] >= limits.max_connections_per_ip
        ):
            self.refused += 1
            log.info("refusing TCP connection from %s: connection limit reached", ip)
            writer.close()
            return
        self.connections += 1
        self.per_ip[ip] += 1
        self._writers.add(writer)
        try:
            await _Connection(self, reader, writer).serve()
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections -= 1
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
            self._writers.discard(writer)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # unsent answers for a client that stopped reading
            else:
                writer.close()

    def close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()


class _Connection:
    def __init__(
        self, front: TcpFrontEnd, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.pending: set[asyncio.Task[None]] = set()
        self.peer = writer.get_extra_info("peername")
        self.slots = asyncio.Semaphore(front.limits.max_pipelined)

    async def serve(self) -> None:
        limits = self.front.limits
        while True:
            message = await self._read_message(limits)
            if message is None:
                break
            if len(message) < wire.HEADER_LEN:
                log.debug("closing TCP connection: %d-octet message", len(message))
                break
            reply = self.front.resolver.cached_reply(message, udp=False, client=self.peer)
            if reply is not None:
                self._send(reply)
                if not await self._drain():
                    break
                continue
            await self.slots.acquire()
            task = self.front.inflight.spawn(self._answer(message))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        if self.pending:
            # The client half-closed after its last query: answer what is in flight.
            await asyncio.wait(set(self.pending))

    async def _read_message(self, limits: TcpLimits) -> bytes | None:
        """The next message, or ``None`` on EOF, idle timeout or a blown deadline."""
        reader = self.reader
        try:
            # Wait for the first octet. The idle timer only closes the connection
            # when nothing is in flight; otherwise answers are still due on it.
            while True:
                try:
                    async with asyncio.timeout(limits.idle_timeout):
                        first = await reader.read(1)
                    break
                except TimeoutError:
                    if not self.pending:
                        raise
            if not first:
                return None
            async with asyncio.timeout(limits.message_timeout):
                second = await reader.readexactly(1)
                (length,) = struct.unpack("!H", first + second)
                return await reader.readexactly(length)
        except TimeoutError:
            log.debug("closing TCP connection: idle or slow sender")
            return None
        except asyncio.IncompleteReadError:
            return None

    async def _answer(self, message: bytes) -> None:
        try:
            reply = await self.front.resolver.resolve(message, udp=False, client=self.peer)
        finally:
            self.slots.release()
        if reply is not None:
            self._send(reply)
            await self._drain()

    def _send(self, reply: bytes) -> None:
        """Write one framed reply, dropping it quietly if the client has gone."""
        if not self.writer.is_closing():
            self.writer.write(struct.pack("!H", len(reply)) + reply)

    async def _drain(self) -> bool:
        """Wait while the client is not reading our answers (the transport pauses us
        above 64 KiB of unsent data). A client that stays stalled past the message
        deadline is cut off and its buffer dropped: ``False``."""
        writer = self.writer
        try:
            async with asyncio.timeout(self.front.limits.message_timeout):
                await writer.drain()
        except TimeoutError:
            log.debug("closing TCP connection: the client does not read its answers")
            writer.transport.abort()
            return False
        except (ConnectionError, OSError):
            return False
        return True
