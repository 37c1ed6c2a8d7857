"""The DoQ upstream: a pool of reused QUIC connections to one DoQ server.

Connections are opened lazily and picked by :func:`pool_policy.pick` (the live
one with the most spare capacity). When all are full, another is opened up to
the maximum; after that queries wait in a bounded queue, and beyond it they
fail at once. A new connection to a server we hold a ticket for carries the
query that caused it as 0-RTT early data in its first flight.

A query whose connection dies under it is retried once on a fresh connection
(DNS queries are idempotent). When connections keep failing to come up, new
attempts back off exponentially and queries fail fast meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.doq import framing
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream import bootstrap, engine, pool_policy
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.doq_connection import ConnectionLost, DoqConnection
from doqproxy.upstream.tickets import TicketFile, upstream_key

log = logging.getLogger(__name__)

PREPARED_MAX_AGE = 5.0
"""Seconds a prepared first flight is kept before it is rebuilt."""

REPLAYABLE_OPCODES = frozenset({wire.OPCODE_QUERY, wire.OPCODE_NOTIFY})
"""Only these may travel as 0-RTT early data (RFC 9250 §4.5)."""


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
    queued: int = 0
    queue_full: int = 0
    idle_closed: int = 0
    closes_by_code: dict[int, int] = field(default_factory=dict)
    datagrams_sent: int = 0
    """Datagrams sent on connections that are closed now (see DoqUpstream.datagrams)."""
    datagrams_received: int = 0


@dataclass(slots=True, frozen=True)
class PoolSettings:
    max_connections: int = 4
    max_streams: int = 100
    """In-flight queries per connection (never more than the peer's MAX_STREAMS)."""
    max_queue: int = 1000
    """Queries that may wait for capacity when every connection is full."""
    idle_timeout: float = 30.0
    """Our QUIC idle timeout; the pool closes idle connections just before it."""
    keepalive: float | None = None
    """Seconds between PINGs on idle connections; ``None`` lets them close."""
    zero_rtt: bool = True
    pad_block: int | None = 128
    dead_after: float = 1.0
    """Least seconds of total silence from the server, while a packet of ours awaits
    its acknowledgement, before a connection is presumed dead (slow answers are not)."""
    max_age: float | None = None
    """Seconds after which a connection takes no new queries and is closed once idle."""
    handshake_timeout: float = 5.0
    """Seconds a handshake may take before the connection counts as failed (backoff)."""
    quic_engine: str = engine.NAME
    """The QUIC engine of the connections (see upstream/engine.py)."""


class DoqUpstream:
    """An :class:`~doqproxy.upstream.base.Upstream` speaking DoQ to one server."""

    def __init__(
        self,
        url: UpstreamUrl,
        configuration: Any,
        settings: PoolSettings = PoolSettings(),
        *,
        tickets: TicketFile | None = None,
        resolve: Callable[[str, int], Awaitable[list[tuple[str, int]]]] | None = None,
        forget: Callable[[str], None] | None = None,
        pins: tuple[str, ...] = (),
    ) -> None:
        self.url = url
        self.resolver = resolve
        """Bootstrap lookup (upstream/bootstrap.py); ``None`` uses the system resolver."""
        self.forget = forget
        """Called with the host name after a failed handshake: look it up again."""
        self.pins = pins
        self._candidates: list[tuple[str, int]] = []
        self._preferred: tuple[str, int] | None = None
        """The address whose handshake last succeeded; new connections go there."""
        self._failed_at: dict[tuple[str, int], float] = {}
        self._rescue: asyncio.Task[None] | None = None
        self._superseded: weakref.WeakSet[DoqConnection] = weakref.WeakSet()
        """Connections closed because another address won: not failures."""
        self.name = str(url)
        self.settings = settings
        self.pad_block = settings.pad_block
        self.stats = PoolStats()
        self.tickets = tickets if tickets is not None else TicketFile(None)
        self._configuration = dataclasses.replace(configuration, idle_timeout=settings.idle_timeout)
        self._key = upstream_key(configuration.server_name or url.host, url.host, url.port)
        if pins:
            # A resumed session shows no certificate: only sessions that passed
            # these very pins may be resumed.
            self._key += " pins=" + ",".join(sorted(pins))
        self._connections: list[DoqConnection] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._backoff = pool_policy.Backoff()
        self._last_error = ""
        self._opening: asyncio.Task[DoqConnection] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._prepared: DoqConnection | None = None
        self._preparing: asyncio.Future[DoqConnection] | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._closed = False
        self.on_handshake: Callable[[float], None] | None = None
        """Called with the network RTT (seconds) measured by each completed handshake."""

    async def query(self, message: bytes, question: Question) -> bytes:
        early = self.settings.zero_rtt and question.opcode in REPLAYABLE_OPCODES
        for attempt in range(2):
            conn = await self._acquire()
            try:
                return await conn.query(message, early=early)
            except ConnectionLost as exc:
                if self._rescue is not None and conn.info.handshake_at is None:
                    # Another address is being tried (Happy Eyeballs): use it.
                    await asyncio.wait({self._rescue}, timeout=self.settings.handshake_timeout)
                elif attempt or (
                    conn.info.handshake_at is None
                    and not conn.info.early_data_sent
                    and not exc.engine_failure
                ):
                    raise UpstreamError(str(exc), exc.ede) from None
                if attempt:
                    raise UpstreamError(str(exc), exc.ede) from None
                self.stats.retries += 1
                log.debug("%s: retrying a query after: %s", self.name, exc)
            finally:
                self._wake_one()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close every connection with DOQ_NO_ERROR and save the tickets."""
        self._closed = True
        if self._maintenance is not None:
            self._maintenance.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("shutting down", Ede.NOT_READY))
        self._discard_prepared()
        for conn in list(self._connections):
            conn.close(framing.DoqError.NO_ERROR, "shutdown")
        if self._preparing is not None:
            self._preparing.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.tickets.save()

    @property
    def configuration(self) -> Any:
        """The QUIC engine's client configuration, with our idle timeout."""
        return self._configuration

    @property
    def connections(self) -> list[DoqConnection]:
        return list(self._connections)

    def datagrams(self) -> tuple[int, int]:
        """QUIC datagrams sent to and received from the server so far."""
        sent, received = self.stats.datagrams_sent, self.stats.datagrams_received
        for conn in self._connections:
            out, back = conn.datagrams
            sent, received = sent + out, received + back
        return sent, received

    @property
    def in_flight(self) -> int:
        return sum(conn.in_flight for conn in self._connections)

    @property
    def queued_now(self) -> int:
        """Queries waiting for capacity right now."""
        return len(self._waiters)

    # --- choosing and opening connections -----------------------------------------

    async def _acquire(self) -> DoqConnection:
        settings = self.settings
        while True:
            if self._closed:
                raise UpstreamError("shutting down", Ede.NOT_READY)
            index = pool_policy.pick(
                self._connections,
                now=time.monotonic(),
                max_streams=settings.max_streams,
                max_age=settings.max_age,
            )
            if index is not None:
                return self._connections[index]
            if len(self._connections) < settings.max_connections:
                return await self._open_shared()
            if len(self._waiters) >= settings.max_queue:
                self.stats.queue_full += 1
                raise UpstreamError("too many queries waiting for a connection", Ede.OTHER)
            self.stats.queued += 1
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _open_shared(self) -> DoqConnection:
        """Open one connection, shared by every query that needs it meanwhile."""
        wait = self._backoff.wait(time.monotonic())
        if wait > 0:
            raise UpstreamError(
                f"unreachable ({self._last_error}); next attempt in {wait:.1f}s",
                Ede.NO_REACHABLE_AUTHORITY,
            )
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[DoqConnection]) -> None:
        self._opening = None
        if not task.cancelled() and task.exception() is None:
            # Those queued for capacity can use the new connection.
            self._on_credit(task.result())

    async def _open(self) -> DoqConnection:
        if self._preparing is not None:
            # A first flight is being prepared right now: it holds the ticket, use it.
            await asyncio.wait({self._preparing})
        conn = self._take_prepared()
        if conn is None:
            address = await self._resolve()
            racing = len(self._candidates) > 1 and self._preferred is None
            if racing and not self.tickets.count(self._key):
                # No 0-RTT possible: the query waits for a handshake anyway.
                conn = await self._race(self._usable_candidates())
            else:
                conn = await self._build(address)
        self._register(conn)
        if self._preferred is None and len(self._candidates) > 1 and not conn.handshake_complete:
            self._rescue = asyncio.ensure_future(self._eyeballs(conn))
            self._rescue.add_done_callback(self._rescued)
        return conn

    def _register(self, conn: DoqConnection) -> None:
        conn.restart_idle_timer()
        self.stats.connections_opened += 1
        self._connections.append(conn)
        conn.handshake_done.add_done_callback(lambda _: self._on_handshake(conn))
        self._start_maintenance()
        log.debug(
            "%s: opening connection %d to %s (ticket: %s)",
            self.name, self.stats.connections_opened, conn.address[0], conn.resumable,
        )  # fmt: skip

    async def _build(self, address: tuple[str, int] | None = None) -> DoqConnection:
        """A connection with its first flight built but not sent (see :meth:`prepare`)."""
        if address is None:
            address = await self._resolve()
        configuration = dataclasses.replace(self._configuration)
        configuration.session_ticket = self.tickets.take(self._key)
        configuration.token = self.tickets.token(self._key)
        conn = DoqConnection(
            address,
            configuration,
            ticket_handler=lambda ticket: self.tickets.add(self._key, ticket),
            token_handler=lambda token: self.tickets.set_token(self._key, token),
            on_dead=self._forget,
            on_credit=self._on_credit,
            quic_engine=self.settings.quic_engine,
        )
        conn.dead_after = self.settings.dead_after
        conn.handshake_timeout = self.settings.handshake_timeout
        conn.pins = self.pins
        try:
            await conn.open()
        except OSError as exc:  # network down, no IPv6 route, ...
            if configuration.session_ticket is not None:
                self.tickets.restore(self._key, configuration.session_ticket)
            self._backoff.failed(time.monotonic())
            self._last_error = f"cannot open a socket to {address[0]}: {exc.strerror or exc}"
            raise UpstreamError(self._last_error, Ede.NETWORK_ERROR) from None
        return conn

    # --- Happy Eyeballs (RFC 8305) ----------------------------------------------

    def _usable_candidates(self) -> list[tuple[str, int]]:
        """Candidates, those that failed within the backoff cap last."""
        recent = time.monotonic() - self._backoff.cap
        fresh = [a for a in self._candidates if self._failed_at.get(a, 0.0) < recent]
        return fresh + [a for a in self._candidates if a not in fresh]

    async def _eyeballs(self, first: DoqConnection) -> None:
        """``first`` (sent with 0-RTT to the first candidate) races the other
        addresses from ATTEMPT_DELAY on; if another completes its handshake first,
        it joins the pool and ``first`` is closed (its queries are retried)."""
        others = [a for a in self._usable_candidates() if a != first.address]

        async def attempt(address: tuple[str, int]) -> DoqConnection:
            if address == first.address:
                await asyncio.shield(first.handshake_done)
                return first
            conn = await self._build(address)
            try:
                conn.flush()
                await asyncio.shield(conn.handshake_done)
            except BaseException:
                conn.close(framing.DoqError.NO_ERROR, "another address answered first")
                raise
            return conn

        try:
            _, winner = await bootstrap.happy_eyeballs([first.address, *others], attempt)
        except (UpstreamError, OSError):
            return
        if winner is not first:
            assert isinstance(winner, DoqConnection)
            self._register(winner)
            if not first.handshake_complete:
                self._superseded.add(first)
                first.close(framing.DoqError.NO_ERROR, "another address answered first")

    def _rescued(self, task: asyncio.Task[None]) -> None:
        if self._rescue is task:
            self._rescue = None

    async def _race(self, addresses: list[tuple[str, int]]) -> DoqConnection:
        """Handshake with the addresses (IPv6 first), each attempt starting
        ATTEMPT_DELAY after the previous one or as soon as it failed; the first
        completed handshake wins and the others are closed. Only done while no
        address is known to work, so that 0-RTT otherwise goes straight out."""

        async def attempt(address: tuple[str, int]) -> DoqConnection:
            conn = await self._build(address)
            try:
                conn.flush()
                await asyncio.shield(conn.handshake_done)
            except BaseException:
                # Closing (or having failed) calls _forget through on_dead.
                conn.close(framing.DoqError.NO_ERROR, "another address answered first")
                raise
            return conn

        try:
            winner, conn = await bootstrap.happy_eyeballs(addresses, attempt)
        except UpstreamError as exc:
            self._backoff.failed(time.monotonic())
            self._last_error = f"no address of {self.url.host} answered: {exc}"
            raise UpstreamError(self._last_error, exc.ede) from None
        except OSError as exc:
            self._backoff.failed(time.monotonic())
            self._last_error = f"no address of {self.url.host} answered: {exc.strerror or exc}"
            raise UpstreamError(self._last_error, Ede.NETWORK_ERROR) from None
        assert isinstance(conn, DoqConnection)
        log.debug("%s: %s answered first", self.name, winner[0])
        return conn

    # --- a prepared first flight -------------------------------------------------

    def start(self) -> None:
        """Prepare a first flight now (in the background: a host-name upstream may need
        a lookup) and start the once-a-second upkeep."""
        log.info("%s: QUIC engine %s", self.name, engine.describe())
        task = asyncio.ensure_future(self.prepare())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._start_maintenance()

    async def prepare(self) -> None:
        """Build the next connection's first flight ahead of the query that needs it.

        Building a resumed ClientHello (PSK binder, early secrets, key shares) takes
        1-3 ms of CPU; done in advance, the first query after a restart or a quiet
        spell leaves at once as 0-RTT data. Only with a ticket and 0-RTT on, and only
        while the pool has no connection. A prepared flight is rebuilt after
        :data:`PREPARED_MAX_AGE` seconds, so that the ticket age it claims stays
        within servers' replay windows (OpenSSL allows 10 s); an unused ticket goes
        back to the store.
        """
        if self._closed or not self.settings.zero_rtt or self._connections:
            return
        prepared = self._prepared
        if prepared is not None:
            if time.monotonic() - prepared.info.opened_at < PREPARED_MAX_AGE:
                return
            self._discard_prepared()
        if not self.tickets.count(self._key) or self._preparing is not None:
            return
        self._preparing = asyncio.ensure_future(self._build())
        try:
            self._prepared = await self._preparing
        except (OSError, UpstreamError) as exc:
            log.debug("%s: cannot prepare a connection: %s", self.name, exc)
        finally:
            self._preparing = None
        self._start_maintenance()

    def _take_prepared(self) -> DoqConnection | None:
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return None
        if time.monotonic() - prepared.info.opened_at < PREPARED_MAX_AGE:
            return prepared
        self._prepared = prepared
        self._discard_prepared()
        return None

    def _discard_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return
        ticket = prepared.configuration.session_ticket
        if ticket is not None:
            self.tickets.restore(self._key, ticket)  # never sent: still good for one use
        prepared.abandon()

    def _start_maintenance(self) -> None:
        if self._maintenance is None and not self._closed:
            self._maintenance = asyncio.ensure_future(self._maintain())

    async def _resolve(self) -> tuple[str, int]:
        host, port = self.url.host, self.url.port
        if self.url.is_ip:
            return host, port
        if self.resolver is not None:
            try:
                addresses = await self.resolver(host, port)
            except UpstreamError as exc:
                self._backoff.failed(time.monotonic())
                self._last_error = str(exc)
                raise UpstreamError(self._last_error, Ede.NO_REACHABLE_AUTHORITY) from None
            self._candidates = addresses
            if self._preferred in addresses:
                return self._preferred
            return self._usable_candidates()[0]
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
            if conn in self._superseded:
                return
            self.stats.connect_failures += 1
            failure = None if conn.handshake_done.cancelled() else conn.handshake_done.exception()
            if isinstance(failure, ConnectionLost) and failure.engine_failure:
                # Our QUIC engine failed, not the server or the path: no backoff, and
                # the next query (or the retry of this one) opens a new connection.
                return
            if self._preferred == conn.address:
                self._preferred = None
            if self.forget is not None:
                self.forget(self.url.host)
            self._failed_at[conn.address] = time.monotonic()
            self._backoff.failed(time.monotonic())
            self._last_error = str(failure) if failure else "handshake failed"
            return
        self._backoff.succeeded()
        self._on_credit(conn)  # the peer's real stream limit is known now
        self._preferred = conn.address
        self._failed_at.pop(conn.address, None)
        stats = self.stats
        stats.handshakes += 1
        stats.sessions_resumed += bool(info.session_resumed)
        stats.early_data_sent += info.early_data_sent
        stats.early_data_accepted += bool(info.early_data_accepted)
        if self.on_handshake is not None:
            srtt = conn.smoothed_rtt
            if srtt is not None:
                self.on_handshake(srtt)

    def _on_credit(self, conn: DoqConnection) -> None:
        """More queries fit on ``conn``: wake as many of those queued for capacity."""
        spare = min(self.settings.max_streams - conn.in_flight, conn.stream_credit)
        for _ in range(spare):
            self._wake_one()

    def _forget(self, conn: DoqConnection) -> None:
        """Called by a connection when it dies: drop it and release its socket."""
        if conn in self._connections:
            self._connections.remove(conn)
        out, back = conn.datagrams
        self.stats.datagrams_sent += out
        self.stats.datagrams_received += back
        code = conn.info.close_code
        if code is not None:
            self.stats.closes_by_code[code] = self.stats.closes_by_code.get(code, 0) + 1
        task = asyncio.ensure_future(conn.wait_closed())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # --- idle connections -------------------------------------------------------

    async def _maintain(self) -> None:
        """Once a second: close connections about to hit their idle timeout (with
        DOQ_NO_ERROR, rather than letting them vanish silently), or ping them when
        a keepalive is configured."""
        settings = self.settings
        while not self._closed:
            await asyncio.sleep(1.0)
            await self.prepare()
            now = time.monotonic()
            for conn in list(self._connections):
                if conn.in_flight or not conn.handshake_complete:
                    continue
                quiet = now - conn.last_heard
                if settings.max_age is not None and now - conn.opened_at >= settings.max_age:
                    self.stats.idle_closed += 1
                    log.debug("%s: closing a connection at its maximum age", self.name)
                    conn.close(framing.DoqError.NO_ERROR, "maximum age")
                elif settings.keepalive is not None:
                    if quiet >= settings.keepalive:
                        conn.ping()
                elif quiet >= conn.idle_timeout - 2.0:
                    self.stats.idle_closed += 1
                    log.debug("%s: closing an idle connection", self.name)
                    conn.close(framing.DoqError.NO_ERROR, "idle")
