"""The plain DNS over UDP front end: hands each datagram to the resolver."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from doqproxy.frontend.inflight import InFlight
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)


class UdpFrontEnd(asyncio.DatagramProtocol):
    """Answers DNS over UDP; replies are truncated to the client's payload size."""

    def __init__(self, resolver: Resolver, inflight: InFlight) -> None:
        self.resolver = resolver
        self.inflight = inflight
        self.accepting = True
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.accepting:
            return
        # A cache hit is answered right here, without the cost of a task.
        reply = self.resolver.cached_reply(data, udp=True, client=addr)
        if reply is not None:
            if self.transport is not None:
                self.transport.sendto(reply, addr)
            return
        self.inflight.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: Any) -> None:
        reply = await self.resolver.resolve(data, udp=True, client=addr)
        transport = self.transport
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (the client went away): nothing to do.
        log.debug("UDP error: %s", exc)
