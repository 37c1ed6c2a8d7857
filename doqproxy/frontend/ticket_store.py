"""The server's in-memory store of TLS session tickets, which makes resumption and 0-RTT work."""

from __future__ import annotations

import time
from collections.abc import Callable

from aioquic.tls import SessionTicket
from cachetools import TTLCache


class TicketStore:
    """Session tickets issued by this process, each usable once, for ``lifetime`` seconds.

    Taking a ticket out when a client presents it makes each ticket single-use, so a
    captured 0-RTT flight cannot be replayed against this process with the same
    ticket. (A replay is still possible against another process sharing the port;
    that is why 0-RTT is limited to replayable opcodes.) Tickets are lost on restart,
    and clients then fall back to a full handshake.
    """

    def __init__(
        self,
        lifetime: float,
        max_tickets: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if lifetime <= 0:
            raise ValueError("ticket lifetime must be positive")
        self.lifetime = lifetime
        self._tickets: TTLCache[bytes, SessionTicket] = TTLCache(
            maxsize=max_tickets, ttl=lifetime, timer=timer
        )
        self.issued = 0
        self.resumed = 0

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: SessionTicket) -> None:
        """aioquic's ``session_ticket_handler``: remember a ticket we issued."""
        self._tickets[ticket.ticket] = ticket
        self.issued += 1

    def pop(self, label: bytes) -> SessionTicket | None:
        """aioquic's ``session_ticket_fetcher``: hand out a ticket once, if still valid."""
        ticket = self._tickets.pop(label, None)
        if ticket is not None:
            self.resumed += 1
        return ticket
