"""The plain DNS over TCP front end (RFC 1035 §4.2.2, RFC 7766).

Each message carries a 2-octet length prefix. Queries pipelined on one
connection are answered concurrently, in the order they complete. The idle
timer runs only while nothing is in flight and is reset only by complete
messages; once a message has started, the rest of it must arrive within a
per-message deadline, so a slow sender cannot hold a connection open.

Memory is bounded however clients behave. A connection whose unsent answers
pass ``high_water`` is not read from until they drain (flow control), and all
connections together may hold at most ``write_budget`` octets of unsent
answers (Unbound's ``stream-wait-size``): past it, the connection holding the
most is closed and its pending answers dropped. Slots are shared fairly
(:mod:`doqproxy.frontend.slots`), and a connection lives at most ``max_age``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass

from doqproxy.dns import wire
from doqproxy.frontend.admission import Admission, Client
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.slots import Admit, SlotLimits, SlotTable
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)

_U16 = struct.Struct("!H")


@dataclass(slots=True, frozen=True)
class TcpLimits:
    idle_timeout: float = 10.0
    """Seconds a connection may sit with nothing in flight (RFC 7766 §6.2.3)."""
    message_timeout: float = 5.0
    """Seconds a started message may take to arrive completely."""
    max_connections: int = 256
    max_connections_per_ip: int = 32
    max_connections_per_prefix: int = 64
    """Per /24 (IPv4) or /56 (IPv6), the rate-limit prefix lengths."""
    max_age: float = 120.0
    """Seconds a connection may live; then it takes no new queries and closes."""
    max_pipelined: int = 100
    """Queries in flight on one connection before we stop reading from it."""
    high_water: int = 65536
    """Unsent octets on one connection above which we stop reading from it."""
    write_budget: int = 4 * 1024 * 1024
    """Unsent octets across all connections (Unbound's stream-wait-size)."""

    def slot_limits(self) -> SlotLimits:
        total = self.max_connections
        return SlotLimits(
            max_connections=total,
            max_per_ip=self.max_connections_per_ip,
            max_per_prefix=self.max_connections_per_prefix,
            reserve=max(total // 8, 1) if total > 8 else 0,
        )


@dataclass(slots=True)
class TcpStats:
    refused: int = 0
    """Connections refused: no slot and no idle connection to close."""
    evicted: int = 0
    """Idle connections closed to make room for a new one."""
    shed: int = 0
    """Connections closed because unsent answers passed the write budget."""
    aged: int = 0
    """Connections closed at the maximum age."""


class TcpFrontEnd:
    """Accepts TCP connections and serves each in its own task."""

    def __init__(
        self, resolver: Resolver, inflight: InFlight, limits: TcpLimits, admission: Admission
    ) -> None:
        self.resolver = resolver
        self.inflight = inflight
        self.limits = limits
        self.admission = admission
        self.slots = SlotTable(limits.slot_limits())
        self.stats = TcpStats()
        self.buffered = 0
        """Unsent octets across connections, as last seen (an upper bound)."""
        self._connections: dict[_Connection, None] = {}  # oldest first

    @property
    def connections(self) -> int:
        return self.slots.total

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        client = self.admission.client(host)
        verdict = self.slots.admit(host, client.key)
        if verdict is Admit.EVICT:
            victim = next((c for c in self._connections if c.idle), None)
            if victim is None:
                verdict = Admit.NO
            else:
                self.stats.evicted += 1
                log.debug("closing the oldest idle TCP connection to make room for %s", host)
                victim.close()
        if verdict is Admit.NO:
            self.stats.refused += 1
            log.info("refusing TCP connection from %s: connection limit reached", host)
            writer.close()
            return
        writer.transport.set_write_buffer_limits(high=self.limits.high_water)
        connection = _Connection(self, reader, writer, host, client)
        self.slots.add(host, client.key)
        self._connections[connection] = None
        try:
            await connection.serve()
        except (ConnectionError, OSError):
            pass
        finally:
            connection.close()

    def release(self, connection: _Connection) -> None:
        """Give back a connection's slot and budget (once)."""
        if self._connections.pop(connection, False) is None:
            self.slots.remove(connection.host, connection.client.key)
            self.buffered -= connection.buffered
            connection.buffered = 0

    def note_buffered(self, connection: _Connection, size: int) -> None:
        """``connection`` now holds ``size`` unsent octets; shed load past the budget."""
        self.buffered += size - connection.buffered
        connection.buffered = size
        if self.buffered > self.limits.write_budget:
            self._shed()

    def _shed(self) -> None:
        total = 0
        for connection in self._connections:
            connection.buffered = connection.writer.transport.get_write_buffer_size()
            total += connection.buffered
        self.buffered = total
        while self.buffered > self.limits.write_budget and self._connections:
            victim = max(self._connections, key=lambda c: c.buffered)
            if not victim.buffered:
                break
            self.stats.shed += 1
            log.info(
                "closing TCP connection from %s: %d octets of answers unsent "
                "(all clients: %d, budget %d)",
                victim.host,
                victim.buffered,
                self.buffered,
                self.limits.write_budget,
            )
            victim.close()

    def close_all(self) -> None:
        for connection in list(self._connections):
            connection.writer.close()


class _Connection:
    def __init__(
        self,
        front: TcpFrontEnd,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        client: Client,
    ) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.host = host
        self.client = client
        self.pending: set[asyncio.Task[None]] = set()
        self.peer = writer.get_extra_info("peername")
        self.slots = asyncio.Semaphore(front.limits.max_pipelined)
        self.opened = time.monotonic()
        self.buffered = 0
        self.waiting = False
        """Waiting for the first octet of a message."""

    @property
    def idle(self) -> bool:
        return self.waiting and not self.pending

    def close(self) -> None:
        """Drop everything: unsent answers, queries in flight, the slot."""
        self.front.release(self)
        for task in list(self.pending):
            task.cancel()
        transport = self.writer.transport
        if transport.get_write_buffer_size():
            transport.abort()  # unsent answers for a client that stopped reading
        else:
            self.writer.close()

    async def serve(self) -> None:
        front = self.front
        limits = front.limits
        admission = front.admission
        while True:
            # Flow control: no new queries until the client reads its answers.
            if (
                self.writer.transport.get_write_buffer_size() > limits.high_water
                and not await self._drain()
            ):
                return
            message = await self._read_message(limits)
            if message is None:
                break
            if len(message) < wire.HEADER_LEN:
                log.debug("closing TCP connection: %d-octet message", len(message))
                break
            verdict = admission.tcp_query(message, self.client)
            if verdict is not None:
                if verdict:
                    self._send(verdict)
                if not self.client.allowed or not await self._drain():
                    break
                continue
            reply = front.resolver.cached_reply(message, udp=False, client=self.peer)
            if reply is None:
                reply = admission.overloaded(message, len(front.inflight))
            if reply is not None:
                self._send(reply)
                if not await self._drain():
                    break
                continue
            await self.slots.acquire()
            task = front.inflight.spawn(self._answer(message))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        if self.pending:
            # The client half-closed after its last query: answer what is in flight.
            await asyncio.wait(set(self.pending))

    async def _read_message(self, limits: TcpLimits) -> bytes | None:
        """The next message, or ``None`` on EOF, idle timeout, maximum age or a blown deadline."""
        reader = self.reader
        try:
            # Wait for the first octet. The idle timer only closes the connection
            # when nothing is in flight; otherwise answers are still due on it.
            self.waiting = True
            while True:
                age_left = self.opened + limits.max_age - time.monotonic()
                if age_left <= 0:
                    self.front.stats.aged += 1
                    log.debug("closing TCP connection from %s: maximum age", self.host)
                    return None
                try:
                    async with asyncio.timeout(min(limits.idle_timeout, age_left)):
                        first = await reader.read(1)
                    break
                except TimeoutError:
                    if not self.pending and age_left > limits.idle_timeout:
                        raise
            self.waiting = False
            if not first:
                return None
            async with asyncio.timeout(limits.message_timeout):
                second = await reader.readexactly(1)
                (length,) = _U16.unpack(first + second)
                return await reader.readexactly(length)
        except TimeoutError:
            log.debug("closing TCP connection: idle or slow sender")
            return None
        except asyncio.IncompleteReadError:
            return None
        finally:
            self.waiting = False

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
        writer = self.writer
        if writer.is_closing():
            return
        if len(reply) > 3 and reply[3] & 0x0F == wire.RCODE_SERVFAIL:
            reply = self.front.admission.ede_for(reply, self.client)
        # Two writes, not a concatenation: no copy of the answer just to prefix it.
        writer.write(_U16.pack(len(reply)))
        writer.write(reply)
        self.front.note_buffered(self, writer.transport.get_write_buffer_size())

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
            self.close()
            return False
        except (ConnectionError, OSError):
            return False
        if not writer.is_closing():
            self.front.note_buffered(self, writer.transport.get_write_buffer_size())
        return not writer.is_closing()
