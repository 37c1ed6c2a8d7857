"""The plain DNS over UDP front end: hands each datagram to the resolver.

Every datagram passes :class:`~doqproxy.frontend.admission.Admission` first
(reflection guard, access list, rate limit, snooping rule, minimal ANY), and
every reply passes it on the way out (error-reply budget, EDE text).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from doqproxy.frontend.access import REFLECTION_PORTS
from doqproxy.frontend.admission import ANY_QUESTION_TAIL, Admission, Client
from doqproxy.frontend.inflight import InFlight
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)


class UdpAnswers:
    """The per-datagram rules of DNS over UDP, shared by both ways of reading a socket
    (:class:`UdpFrontEnd` and :class:`~doqproxy.frontend.udp_drain.DrainedUdpFront`):
    admission on the way in and out, cache hits answered at once, misses in a task.
    Replies go out through :meth:`send`."""

    resolver: Resolver
    inflight: InFlight
    admission: Admission
    accepting: bool

    def send(self, reply: bytes, addr: Any) -> None:
        """Send a reply to the datagram being handled (its socket is open)."""
        raise NotImplementedError

    def send_late(self, reply: bytes, addr: Any) -> None:
        """Send a reply to a datagram read earlier: the socket may be closing by now."""
        self.send(reply, addr)

    def receive(self, data: bytes, addr: Any) -> None:
        """Handle one datagram from ``addr``."""
        if not self.accepting:
            return
        admission = self.admission
        # Fast lane: for a client no per-client rule applies to (loopback, no rate
        # limit), the reflection and ANY checks are all of admission; anyone else
        # takes the full checks.
        client = admission.trusted.get(addr[0])
        if client is None or addr[1] in REFLECTION_PORTS or ANY_QUESTION_TAIL in data:
            verdict = admission.udp_query(data, addr[0], addr[1], time.monotonic())
            if verdict is not None:
                if verdict:
                    self.send(verdict, addr)
                return
            client = admission.client(addr[0])
        # A cache hit is answered right here, without the cost of a task.
        reply = self.resolver.cached_reply(data, udp=True, client=addr)
        if reply is None:
            reply = admission.overloaded(data, len(self.inflight))
            if reply is None:
                self.inflight.spawn(self._answer(data, addr, client))
                return
        reply = admission.udp_reply(reply, client, time.monotonic())
        if reply:
            self.send(reply, addr)

    async def _answer(self, data: bytes, addr: Any, client: Client) -> None:
        reply = await self.resolver.resolve(data, udp=True, client=addr, cache_checked=True)
        if reply is None:
            return
        reply = self.admission.udp_reply(reply, client, time.monotonic())
        if reply:
            self.send_late(reply, addr)


class UdpFrontEnd(UdpAnswers, asyncio.DatagramProtocol):
    """Answers DNS over UDP with one protocol callback per datagram; replies are
    truncated to the client's payload size."""

    def __init__(self, resolver: Resolver, inflight: InFlight, admission: Admission) -> None:
        self.resolver = resolver
        self.inflight = inflight
        self.admission = admission
        self.accepting = True
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    datagram_received = UdpAnswers.receive

    def send(self, reply: bytes, addr: Any) -> None:
        # A datagram just arrived on this transport, so it is open: no check on the
        # cache-hit path.
        self.transport.sendto(reply, addr)  # type: ignore[union-attr]

    def send_late(self, reply: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (the client went away): nothing to do.
        log.debug("UDP error: %s", exc)
