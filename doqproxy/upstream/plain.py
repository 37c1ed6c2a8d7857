"""An :class:`~doqproxy.upstream.base.Upstream` that asks a plain DNS server over UDP, then TCP.

DoQ queries carry ID 0 (RFC 9250 §4.2.1). A plain DNS server must not see that:
every query leaves here with a fresh random non-zero ID, and only a reply with
that ID *and* the same question is accepted (RFC 5452). Replies from another
address never arrive (the sockets are connected). A truncated UDP reply (TC=1)
is asked again over TCP. The answer goes back with ID 0.

UDP queries share a bounded set of sockets (:data:`UDP_SOCKETS`), each connected
from a random source port chosen by the kernel and replaced after
:data:`SOCKET_USES` queries, so the source port keeps changing without one file
descriptor per query. At most ``max_in_flight`` queries wait at once; beyond
that a query fails at once (SERVFAIL for the client) rather than opening more.

Error messages name the upstream by ``display_name``, so that a deployment can
keep the backend's address out of the EDE text clients see.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import struct

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.base import UpstreamError

UDP_RETRY_INTERVAL = 1.0
"""Seconds to wait for a UDP reply before sending the query again."""
UDP_SOCKETS = 16
"""Shared UDP sockets towards the backend."""
SOCKET_USES = 512
"""Queries a socket carries before it is replaced (a new random source port)."""
MAX_IN_FLIGHT = 1024
"""Default cap on queries waiting for the backend at once."""

_Key = tuple[int, bytes, int]


def fresh_id() -> int:
    """A random message ID from 1 to 65535."""
    return secrets.randbelow(0xFFFF) + 1


def reply_key(data: bytes) -> _Key | None:
    """(ID, lower-case question name, QTYPE) of a reply, ``None`` if unreadable."""
    if len(data) < wire.HEADER_LEN or data[4:6] == b"\0\0":
        return None
    scanned = wire.scan_question(data)
    if scanned is None:
        return None
    name_end, qtype = scanned
    return wire.get_id(data), data[wire.HEADER_LEN : name_end].lower(), qtype


class _SharedSocket(asyncio.DatagramProtocol):
    """One connected UDP socket carrying many queries, told apart by (ID, question)."""

    def __init__(self) -> None:
        self.pending: dict[_Key, asyncio.Future[bytes]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.uses = 0
        self.ignored = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        key = reply_key(data)
        future = self.pending.get(key) if key is not None else None
        if future is None or future.done():
            self.ignored += 1
            return
        future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like, on a connected socket: the backend is
        # not there, for every query on this socket.
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("upstream socket closed"))

    def new_key(self, question: Question) -> _Key:
        name = question.qname.lower()
        while True:
            key = (fresh_id(), name, question.qtype)
            if key not in self.pending:
                return key


class PlainUpstream:
    """Forwards to ``udp://HOST:PORT``, with TCP fallback on truncation."""

    pad_block: int | None = None
    """Padding is for encrypted transports (RFC 8467); plain DNS gets none."""

    def __init__(
        self,
        url: UpstreamUrl,
        *,
        tcp_timeout: float = 5.0,
        max_in_flight: int = MAX_IN_FLIGHT,
        display_name: str | None = None,
        sockets: int = UDP_SOCKETS,
    ) -> None:
        self.url = str(url)
        self.name = display_name or self.url
        self.address = (url.host, url.port)
        self.tcp_timeout = tcp_timeout
        self.max_in_flight = max_in_flight
        self.tcp_fallbacks = 0
        self.ignored_replies = 0
        self.overloaded = 0
        """Queries failed at once because ``max_in_flight`` were waiting."""
        self.in_flight = 0
        self._slots: list[_SharedSocket | None] = [None] * sockets
        self._opening: dict[int, asyncio.Future[_SharedSocket]] = {}

    async def query(self, message: bytes, question: Question) -> bytes:
        """Ask over UDP, and over TCP if the UDP answer is truncated; return it with ID 0."""
        if self.in_flight >= self.max_in_flight:
            self.overloaded += 1
            raise UpstreamError("too many queries in flight", Ede.OTHER)
        self.in_flight += 1
        try:
            reply = await self._udp(message, question)
            if wire.is_truncated(reply):
                self.tcp_fallbacks += 1
                reply = await self._tcp(message)
        finally:
            self.in_flight -= 1
        return wire.set_id(reply, 0)

    @property
    def open_sockets(self) -> int:
        return sum(slot is not None and not slot.closed for slot in self._slots)

    async def aclose(self) -> None:
        """Close the shared sockets; queries still waiting fail."""
        for n, slot in enumerate(self._slots):
            if slot is not None and slot.transport is not None:
                slot.transport.close()
            self._slots[n] = None

    async def _socket(self) -> _SharedSocket:
        n = random.randrange(len(self._slots))
        slot = self._slots[n]
        if slot is not None and not slot.closed and slot.uses < SOCKET_USES:
            return slot
        opening = self._opening.get(n)
        if opening is None:
            # One opening per slot: a burst of queries must not open a socket each.
            opening = self._opening[n] = asyncio.ensure_future(self._open(n))
            opening.add_done_callback(lambda _: self._opening.pop(n, None))
        return await asyncio.shield(opening)

    async def _open(self, n: int) -> _SharedSocket:
        loop = asyncio.get_running_loop()
        try:
            _, fresh = await loop.create_datagram_endpoint(_SharedSocket, remote_addr=self.address)
        except OSError as exc:
            message = f"cannot reach it: {exc.strerror or exc}"
            raise UpstreamError(message, Ede.NETWORK_ERROR) from None
        old, self._slots[n] = self._slots[n], fresh
        if old is not None:
            self._retire(old)
        return fresh

    @staticmethod
    def _retire(slot: _SharedSocket) -> None:
        """Close a replaced socket once its last query is over."""
        if not slot.pending and slot.transport is not None:
            slot.transport.close()

    async def _udp(self, message: bytes, question: Question) -> bytes:
        shared = await self._socket()
        shared.uses += 1
        key = shared.new_key(question)
        outgoing = wire.set_id(message, key[0])
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        shared.pending[key] = future
        assert shared.transport is not None
        try:
            while True:
                shared.transport.sendto(outgoing)
                done, _ = await asyncio.wait({future}, timeout=UDP_RETRY_INTERVAL)
                if done:
                    return future.result()
        except OSError as exc:
            raise UpstreamError(f"over UDP: {exc.strerror or exc}", Ede.NETWORK_ERROR) from None
        finally:
            del shared.pending[key]
            self.ignored_replies += shared.ignored
            shared.ignored = 0
            if shared not in self._slots:
                self._retire(shared)
            elif isinstance(
                future.exception() if future.done() and not future.cancelled() else None, OSError
            ):
                # The socket reported an error (ICMP): start afresh on the next query.
                self._drop(shared)

    def _drop(self, shared: _SharedSocket) -> None:
        for n, slot in enumerate(self._slots):
            if slot is shared:
                self._slots[n] = None
        self._retire(shared)  # out of the slots: nobody else would ever close it

    async def _tcp(self, message: bytes) -> bytes:
        msg_id = fresh_id()
        try:
            async with asyncio.timeout(self.tcp_timeout):
                reader, writer = await asyncio.open_connection(*self.address)
                try:
                    writer.write(struct.pack("!H", len(message)) + wire.set_id(message, msg_id))
                    await writer.drain()
                    while True:
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        reply = await reader.readexactly(length)
                        if len(reply) >= wire.HEADER_LEN and wire.get_id(reply) == msg_id:
                            return reply
                        self.ignored_replies += 1
                finally:
                    writer.close()
        except TimeoutError:
            raise UpstreamError(
                f"over TCP: no answer within {self.tcp_timeout:g}s",
                Ede.NO_REACHABLE_AUTHORITY,
            ) from None
        except asyncio.IncompleteReadError:
            raise UpstreamError("over TCP: connection closed early") from None
        except OSError as exc:
            raise UpstreamError(f"over TCP: {exc.strerror or exc}") from None
