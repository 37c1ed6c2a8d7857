"""An :class:`~doqproxy.upstream.base.Upstream` that asks a plain DNS server over UDP, then TCP.

DoQ queries carry ID 0 (RFC 9250 §4.2.1). A plain DNS server must not see that:
every query leaves here with a fresh random non-zero ID, and only a reply with that
ID is accepted. Replies with another ID are ignored (they may be spoofed or
late), as are replies from another address (the socket is connected). A truncated
UDP reply (TC=1) is asked again over TCP. The answer goes back with ID 0.
"""

from __future__ import annotations

import asyncio
import secrets
import struct

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.base import UpstreamError

UDP_RETRY_INTERVAL = 1.0
"""Seconds to wait for a UDP reply before sending the query again."""


def fresh_id() -> int:
    """A random message ID from 1 to 65535."""
    return secrets.randbelow(0xFFFF) + 1


class _UdpExchange(asyncio.DatagramProtocol):
    """One query's UDP socket: keeps the first reply that carries ``msg_id``."""

    def __init__(self, msg_id: int) -> None:
        self.msg_id = msg_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.ignored = 0

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.reply.done():
            return
        if len(data) < wire.HEADER_LEN or wire.get_id(data) != self.msg_id:
            self.ignored += 1
            return
        self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like, on a connected socket.
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only happens once the query is over; nobody waits for the future any more.
        self.reply.cancel()


class PlainUpstream:
    """Forwards to ``udp://HOST:PORT``, with TCP fallback on truncation."""

    pad_block: int | None = None
    """Padding is for encrypted transports (RFC 8467); plain DNS gets none."""

    def __init__(self, url: UpstreamUrl, *, tcp_timeout: float = 5.0) -> None:
        self.name = str(url)
        self.address = (url.host, url.port)
        self.tcp_timeout = tcp_timeout
        self.tcp_fallbacks = 0
        self.ignored_replies = 0

    async def query(self, message: bytes, question: Question) -> bytes:
        """Ask over UDP, and over TCP if the UDP answer is truncated; return it with ID 0."""
        reply = await self._udp(message)
        if wire.is_truncated(reply):
            self.tcp_fallbacks += 1
            reply = await self._tcp(message)
        return wire.set_id(reply, 0)

    async def aclose(self) -> None:
        """Nothing is kept open between queries."""

    async def _udp(self, message: bytes) -> bytes:
        msg_id = fresh_id()
        outgoing = wire.set_id(message, msg_id)
        loop = asyncio.get_running_loop()
        try:
            transport, exchange = await loop.create_datagram_endpoint(
                lambda: _UdpExchange(msg_id), remote_addr=self.address
            )
        except OSError as exc:
            raise UpstreamError(f"cannot reach {self.name}: {exc.strerror or exc}") from None
        try:
            while True:
                transport.sendto(outgoing)
                done, _ = await asyncio.wait({exchange.reply}, timeout=UDP_RETRY_INTERVAL)
                if done:
                    return exchange.reply.result()
        except OSError as exc:
            raise UpstreamError(
                f"{self.name} over UDP: {exc.strerror or exc}", Ede.NETWORK_ERROR
            ) from None
        finally:
            self.ignored_replies += exchange.ignored
            transport.close()

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
                f"{self.name} over TCP: no answer within {self.tcp_timeout:g}s",
                Ede.NO_REACHABLE_AUTHORITY,
            ) from None
        except asyncio.IncompleteReadError:
            raise UpstreamError(f"{self.name} over TCP: connection closed early") from None
        except OSError as exc:
            raise UpstreamError(f"{self.name} over TCP: {exc.strerror or exc}") from None
