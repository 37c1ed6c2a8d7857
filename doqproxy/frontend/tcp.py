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
from collections import OrderedDict, deque
from dataclasses import dataclass

from doqproxy.dns import wire
from doqproxy.frontend.admission import Admission, Client
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.slots import Admit, SlotLimits, SlotTable
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)

_U16 = struct.Struct("!H")
SHARE_MIN = 1024
"""Queued answers at least this long are shared between clients when they differ only in ID."""
SHARED_BODIES = 16
"""Answers remembered for sharing (at most about 1 MB)."""
MAX_REFUSING = 64
"""Connections from clients outside the access list kept at once (to answer REFUSED)."""


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
    shared: int = 0
    """Queued answers that share another client's copy (they differ only in ID)."""


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
        self._refused_writers: set[asyncio.StreamWriter] = set()
        self._bodies: OrderedDict[tuple[int, bytes], bytes] = OrderedDict()

    @property
    def connections(self) -> int:
        return self.slots.total

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        client = self.admission.client(host)
        if not client.allowed:
            await self._refuse(reader, writer, client)
            return
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

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: Client
    ) -> None:
        """A client outside the access list: REFUSED to its first query, then closed.
        It takes no slot (or it could hold them all and lock out the LAN); at most
        :data:`MAX_REFUSING` such connections are kept at once, the rest closed unread."""
        if len(self._refused_writers) >= MAX_REFUSING:
            self.admission.stats.refused["acl"] += 1
            writer.close()
            return
        self._refused_writers.add(writer)
        try:
            async with asyncio.timeout(self.limits.message_timeout):
                (length,) = _U16.unpack(await reader.readexactly(2))
                message = await reader.readexactly(length)
                reply = self.admission.tcp_query(message, client)
                if reply:
                    writer.write(_U16.pack(len(reply)) + reply)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._refused_writers.discard(writer)
            writer.close()

    def release(self, connection: _Connection) -> None:
        """Give back a connection's slot and budget (once)."""
        if self._connections.pop(connection, False) is None:
            self.slots.remove(connection.host, connection.client.key)
            self.buffered -= connection.buffered
            connection.buffered = 0

    def note_buffered(self, connection: _Connection, size: int) -> None:
        """``connection`` now holds ``size`` unsent octets; shed load past the budget."""
        if connection not in self._connections:
            return  # closed already: its octets are no longer ours to count
        self.buffered += size - connection.buffered
        connection.buffered = size
        if self.buffered > self.limits.write_budget:
            self._shed()

    def _shed(self) -> None:
        total = 0
        for connection in self._connections:
            transport = connection.writer.transport
            connection.buffered = transport.get_write_buffer_size() + connection.queued
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

    def shared(self, reply: bytes) -> bytes:
        """An answer queued for another client that differs from ``reply`` only in
        its ID (clients waiting on one upstream answer), or ``reply`` itself."""
        if len(reply) < SHARE_MIN:
            return reply
        key = (len(reply), reply[2:66])
        known = self._bodies.get(key)
        if known is not None and known.endswith(memoryview(reply)[2:]):
            self.stats.shared += 1
            return known
        self._bodies[key] = reply
        if len(self._bodies) > SHARED_BODIES:
            self._bodies.popitem(last=False)
        return reply

    def close_all(self) -> None:
        for connection in list(self._connections):
            connection.writer.close()
        for writer in list(self._refused_writers):
            writer.close()


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
        """Octets of answers not yet sent: ours queued plus the transport's."""
        self.queue: deque[tuple[bytes, bytes]] = deque()
        """(ID, answer): the answer may be another client's copy, sent after the ID."""
        self.queued = 0
        self.flusher: asyncio.Task[None] | None = None
        self.waiting = False
        """Waiting for the first octet of a message."""

    @property
    def idle(self) -> bool:
        return self.waiting and not self.pending

    def close(self) -> None:
        """Drop everything: queued and unsent answers, queries in flight, the slot."""
        self.front.release(self)
        self.queue.clear()
        self.queued = 0
        for task in list(self.pending):
            task.cancel()
        if self.flusher is not None:
            self.flusher.cancel()
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
            # Flow control: no new queries until the client has read its answers.
            if not await self._flushed():
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
                if not self.client.allowed:
                    break
                continue
            reply = front.resolver.cached_reply(message, udp=False, client=self.peer)
            if reply is None:
                reply = admission.overloaded(message, len(front.inflight))
            if reply is not None:
                self._send(reply)
                continue
            await self.slots.acquire()
            task = front.inflight.spawn(self._answer(message))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        if self.pending:
            # The client half-closed after its last query: answer what is in flight.
            await asyncio.wait(set(self.pending))
        await self._flushed()

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

    def _send(self, reply: bytes) -> None:
        """Write one framed reply, or queue it while the client is behind; drop it
        quietly if the client has gone."""
        writer = self.writer
        if writer.is_closing():
            return
        if len(reply) > 3 and reply[3] & 0x0F == wire.RCODE_SERVFAIL:
            reply = self.front.admission.ede_for(reply, self.client)
        transport = writer.transport
        if not self.queue and transport.get_write_buffer_size() < self.front.limits.high_water:
            # Two writes, not a concatenation: no copy of the answer just to prefix it.
            writer.write(_U16.pack(len(reply)))
            writer.write(reply)
        else:
            # Our own queue holds references, not copies, and close() frees it at
            # once; a transport's buffer is only freed on a later loop turn.
            self.queue.append((reply[:2], self.front.shared(reply)))
            self.queued += len(reply) + 2
            if self.flusher is None:
                self.flusher = asyncio.get_running_loop().create_task(self._flush())
        self.front.note_buffered(self, transport.get_write_buffer_size() + self.queued)

    async def _flush(self) -> None:
        """Feed queued answers to the transport as the client reads."""
        writer = self.writer
        try:
            while self.queue:
                if not await self._drain():
                    return
                transport = writer.transport
                high_water = self.front.limits.high_water
                while self.queue and transport.get_write_buffer_size() < high_water:
                    msg_id, reply = self.queue.popleft()
                    self.queued -= len(reply) + 2
                    writer.write(_U16.pack(len(reply)) + msg_id)
                    writer.write(memoryview(reply)[2:])
                self.front.note_buffered(self, transport.get_write_buffer_size() + self.queued)
        finally:
            self.flusher = None

    async def _flushed(self) -> bool:
        """Wait until queued answers are with the transport and it is below its
        high-water mark; ``False`` if the connection was closed meanwhile."""
        while self.queue or (
            self.writer.transport.get_write_buffer_size() > self.front.limits.high_water
        ):
            flusher = self.flusher
            if flusher is not None:
                await asyncio.wait({flusher})
            elif not await self._drain():
                return False
            if self.writer.is_closing():
                return False
        return not self.writer.is_closing()

    async def _drain(self) -> bool:
        """Wait while the client is not reading our answers (the transport pauses us
        above ``high_water``). A client that stays stalled past the message deadline
        is cut off and its answers dropped: ``False``."""
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
        return not writer.is_closing()
