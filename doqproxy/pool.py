"""The DoQ upstream: a pool of reused QUIC connections to one DoQ server.

Connections are opened lazily, picked by :func:`pool_policy.pick`, and replaced
when they die. A query whose connection dies under it is retried once on a
fresh connection (DNS queries are idempotent). When connections keep failing to
come up, new attempts back off exponentially and queries fail fast meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass, field

from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import SessionTicket

from . import doq, pool_policy
from .addresses import UpstreamUrl
from .doq_client import ConnectionLost, DoqConnection
from .upstream import Ede, UpstreamError
from .wire import Question

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PoolStats:
    """Counters for logs and metrics."""

    connections_opened: int = 0
    handshakes: int = 0
    sessions_resumed: int = 0
    early_data_sent: int = 0
    early_data_accepted: int = 0
    retries: int = 0
    connect_failures: int = 0
    closes_by_code: dict[int, int] = field(default_factory=dict)


class TicketStore:
    """Session tickets per upstream; each ticket is used once (RFC 8446 §C.4)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._tickets: dict[str, list[SessionTicket]] = {}

    def add(self, key: str, ticket: SessionTicket) -> None:
        tickets = self._tickets.setdefault(key, [])
        tickets.append(ticket)
        del tickets[: -self.keep]

    def take(self, key: str) -> SessionTicket | None:
        tickets = self._tickets.get(key, [])
        while tickets:
            ticket = tickets.pop()
            if ticket.is_valid:
                return ticket
        return None


@dataclass(slots=True, frozen=True)
class PoolSettings:
    max_connections: int = 1
    max_streams: int = 100
    idle_timeout: float = 30.0
    pad_block: int | None = 128


class DoqUpstream:
    """An :class:`~doqproxy.upstream.Upstream` speaking DoQ to one server."""

    def __init__(
        self,
        url: UpstreamUrl,
        configuration: QuicConfiguration,
        settings: PoolSettings = PoolSettings(),
        *,
        tickets: TicketStore | None = None,
    ) -> None:
        self.url = url
        self.name = str(url)
        self.settings = settings
        self.pad_block = settings.pad_block
        self.stats = PoolStats()
        self._configuration = configuration
        self._tickets = tickets if tickets is not None else TicketStore()
        self._ticket_key = f"{configuration.server_name}|{url.host}|{url.port}"
        self._connections: list[DoqConnection] = []
        self._backoff = pool_policy.Backoff()
        self._last_error = ""
        self._opening: asyncio.Task[DoqConnection] | None = None
        self._closed = False
        self._closing: set[asyncio.Future[None]] = set()

    async def query(self, message: bytes, question: Question) -> bytes:
        for attempt in range(2):
            conn = await self._acquire()
            try:
                return await conn.query(message)
            except ConnectionLost as exc:
                if attempt or conn.info.handshake_at is None:
                    raise UpstreamError(str(exc), exc.ede) from None
                self.stats.retries += 1
                log.debug("%s: retrying a query after: %s", self.name, exc)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        connections = list(self._connections)
        for conn in connections:
            conn.close(doq.DoqError.NO_ERROR, "shutdown")
        await asyncio.gather(*self._closing)

    @property
    def connections(self) -> list[DoqConnection]:
        return list(self._connections)

    # --- pool management ---------------------------------------------------

    async def _acquire(self) -> DoqConnection:
        if self._closed:
            raise UpstreamError("shutting down", Ede.NOT_READY)
        now = time.monotonic()
        settings = self.settings
        index = pool_policy.pick(
            self._connections,
            now=now,
            max_streams=settings.max_streams,
            idle_timeout=settings.idle_timeout,
        )
        if index is not None:
            return self._connections[index]
        if len(self._connections) >= settings.max_connections:
            # Everything is busy: the least loaded one queues the stream.
            return min(self._connections, key=lambda c: c.in_flight)
        wait = self._backoff.wait(now)
        if wait > 0:
            raise UpstreamError(
                f"unreachable ({self._last_error}); next attempt in {wait:.1f}s",
                Ede.NO_REACHABLE_AUTHORITY,
            )
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._opening)
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None

    async def _open(self) -> DoqConnection:
        address = await self._resolve()
        configuration = dataclasses.replace(self._configuration)
        configuration.session_ticket = self._tickets.take(self._ticket_key)
        conn = DoqConnection(
            address,
            configuration,
            ticket_handler=lambda ticket: self._tickets.add(self._ticket_key, ticket),
            on_dead=self._forget,
        )
        await conn.open()
        self.stats.connections_opened += 1
        self._connections.append(conn)
        conn.handshake_done.add_done_callback(lambda _: self._on_handshake(conn))
        return conn

    async def _resolve(self) -> tuple[str, int]:
        host, port = self.url.host, self.url.port
        if self.url.is_ip:
            return host, port
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            self._backoff.failed(time.monotonic())
            self._last_error = f"cannot resolve {host}: {exc}"
            raise UpstreamError(self._last_error, Ede.NO_REACHABLE_AUTHORITY) from None
        address = infos[0][4]
        return str(address[0]), int(address[1])

    def _on_handshake(self, conn: DoqConnection) -> None:
        info = conn.info
        if conn.handshake_done.cancelled() or conn.handshake_done.exception() is not None:
            self.stats.connect_failures += 1
            self._backoff.failed(time.monotonic())
            self._last_error = info.close_reason or "handshake failed"
            return
        self._backoff.succeeded()
        stats = self.stats
        stats.handshakes += 1
        stats.sessions_resumed += bool(info.session_resumed)
        stats.early_data_sent += info.early_data_sent
        stats.early_data_accepted += bool(info.early_data_accepted)

    def _forget(self, conn: DoqConnection) -> None:
        """Called by a connection when it dies: drop it and release its socket."""
        if conn in self._connections:
            self._connections.remove(conn)
        code = conn.info.close_code
        if code is not None:
            self.stats.closes_by_code[code] = self.stats.closes_by_code.get(code, 0) + 1
        task = asyncio.ensure_future(conn.wait_closed())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
