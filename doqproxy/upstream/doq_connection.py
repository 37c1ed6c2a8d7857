"""One DNS-over-QUIC client connection: the DoQ logic over a QUIC engine session.

:class:`DoqConnection` sends each query on a fresh bidirectional stream and
resolves a future when the answer's stream ends. Queries written before the
handshake completes go out as 0-RTT early data when a session ticket allows it.
It never opens a stream beyond the server's credit, and judges liveness by the
server's acknowledgements. The QUIC library itself is behind
:mod:`doqproxy.upstream.engine` (aioquic: :mod:`~doqproxy.upstream.engine_aioquic`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from doqproxy.dns.ede import Ede
from doqproxy.doq import framing
from doqproxy.upstream import engine
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.engine import ClientSession, SessionClosed
from doqproxy.upstream.pins import PinMismatch, check_pin

log = logging.getLogger(__name__)

UNKNOWN_STREAM_CREDIT = 10
"""Streams assumed allowed on a connection whose peer limit is not known yet (no
ticket carried it and the handshake is not done): a small guess, so that a
burst on a cold pool spreads over connections instead of queueing behind a
limit that may be lower than ours."""


class ConnectionLost(UpstreamError):
    """The connection died before the answer arrived; the query may be retried."""

    engine_failure = False
    """The QUIC engine's own core failed: worth a new connection even before any
    handshake (the server and the path are not to blame)."""


@dataclass(slots=True)
class ConnectionInfo:
    """What happened on one connection, for logs, stats and ``doqproxy query``."""

    opened_at: float = 0.0
    handshake_at: float | None = None
    first_byte_at: float | None = None
    early_data_sent: bool = False
    early_data_accepted: bool | None = None
    session_resumed: bool | None = None
    alpn: str | None = None
    close_code: int | None = None
    close_reason: str = ""
    close_by_peer: bool = False


class DoqConnection:
    """One QUIC connection to a DoQ server, carrying many concurrent queries."""

    def __init__(
        self,
        address: tuple[str, int],
        configuration: Any,
        *,
        ticket_handler: Callable[[Any], None] | None = None,
        token_handler: Callable[[bytes], None] | None = None,
        on_dead: Callable[[DoqConnection], None] | None = None,
        on_credit: Callable[[DoqConnection], None] | None = None,
        quic_engine: str | None = None,
    ) -> None:
        self.address = address
        self._on_dead = on_dead
        self._on_credit_change = on_credit
        self.configuration = configuration
        """The engine's client configuration (its ``session_ticket`` says whether
        this connection may send early data)."""
        self.info = ConnectionInfo(opened_at=time.monotonic())
        self.last_heard = self.info.opened_at
        self.in_flight = 0
        self.last_used = self.info.opened_at
        self.dead = False
        self.dead_after = 1.0
        """Least seconds without a single packet from the server, while one of ours
        awaits its acknowledgement, before the connection is presumed dead."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._heard_mark = 0.0
        self._known_limit = 0
        self._credit_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.handshake_timeout = 5.0
        """Seconds from the first flight to a completed handshake before giving up
        (an upstream that drops our packets without an ICMP error)."""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.pins: tuple[str, ...] = ()  # accepted SPKI SHA-256 pins (base64), if any
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, tuple[framing.StreamReader, asyncio.Future[bytes]]] = {}
        self._session: ClientSession | None = None
        self._engine = engine.get(quic_engine)
        self._handlers = (ticket_handler, token_handler)

    # --- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create the socket and prepare the handshake. The first flight waits for
        :meth:`query` or :meth:`flush`, so that a query can ride along as 0-RTT."""
        ticket_handler, token_handler = self._handlers
        session = self._engine.new_session(
            self, self.configuration, ticket_handler=ticket_handler, token_handler=token_handler
        )
        await session.open(self.address)
        self._session = session
        self._known_limit = session.stream_limit
        self.info.opened_at = time.monotonic()

    @property
    def session(self) -> ClientSession:
        """The engine's session (its internals are for tests and the probe)."""
        assert self._session is not None
        return self._session

    @property
    def datagrams(self) -> tuple[int, int]:
        """Datagrams sent and received on this connection so far."""
        return (0, 0) if self._session is None else self._session.datagrams

    @property
    def cipher(self) -> str | None:
        return None if self._session is None else self._session.cipher

    @property
    def smoothed_rtt(self) -> float | None:
        """The smoothed RTT in seconds, once measured."""
        return None if self._session is None else self._session.smoothed_rtt

    @property
    def usable(self) -> bool:
        return not self.dead and self._session is not None

    @property
    def resumable(self) -> bool:
        """A session ticket was given, so early data can go in the first flight."""
        return getattr(self.configuration, "session_ticket", None) is not None

    def close(self, code: int = framing.DoqError.NO_ERROR, reason: str = "") -> None:
        """Close with a DoQ error code; pending queries fail with :class:`ConnectionLost`."""
        if self._session is not None and not self.dead:
            self._session.close(code, reason)
        self._fail(ConnectionLost(f"connection closed locally ({reason or 'shutdown'})"))

    async def wait_closed(self, grace: float = 1.0) -> None:
        """Wait until the close has gone out, then release the socket."""
        if self._session is not None:
            await self._session.wait_closed(grace)

    def abandon(self) -> None:
        """Drop a connection that never sent anything: no close is due to anyone."""
        self.dead = True
        if self._session is not None:
            self._session.abandon()

    def flush(self) -> None:
        """Send whatever is pending, the first flight included, at the end of this
        event-loop turn (so that queries written in the same turn share packets)."""
        if self._session is not None:
            self._session.transmit_soon()
            self._arm_handshake_timer()

    def restart_idle_timer(self) -> None:
        """Count the idle timeout from now: a prepared connection may have waited."""
        if self._session is not None:
            self._session.restart_idle_timer()

    def ping(self) -> None:
        """Send a PING (for the opt-in keepalive)."""
        if self._session is not None and not self.dead:
            self._session.ping()

    # --- capacity ------------------------------------------------------------

    @property
    def opened_at(self) -> float:
        return self.info.opened_at

    @property
    def handshake_complete(self) -> bool:
        return self.handshake_done.done() and self.handshake_done.exception() is None

    @property
    def stream_credit(self) -> int:
        """Queries this connection can still take without exceeding the peer's limit:
        its MAX_STREAMS, minus the streams opened, minus the queries admitted that
        have no stream yet (waiting for the handshake or for credit).

        Before the handshake the peer's limit is unknown unless a ticket carried
        it; then :data:`UNKNOWN_STREAM_CREDIT` is assumed.
        """
        session = self._session
        if session is None:
            return 0
        limit = session.stream_limit
        if not limit and not self.handshake_done.done():
            limit = UNKNOWN_STREAM_CREDIT
        waiting = self.in_flight - len(self._pending)
        return limit - session.streams_opened - max(0, waiting)

    @property
    def idle_timeout(self) -> float:
        """The negotiated idle timeout: min(ours, the peer's), at least 3 PTO."""
        return 0.0 if self._session is None else self._session.idle_timeout

    # --- queries -----------------------------------------------------------

    async def query(self, message: bytes, *, early: bool = True) -> bytes:
        """Send one DNS message on a new stream and return the answer's message.

        Before the handshake completes the message rides as 0-RTT early data when
        a ticket allows it and ``early`` is true; otherwise it waits for the
        handshake (non-replayable messages must never go as early data).
        """
        if self.dead or self._session is None:
            raise ConnectionLost("connection is closed")
        self.in_flight += 1  # counted while waiting for the handshake too (pool capacity)
        try:
            if not self.handshake_done.done() and not (early and self.resumable):
                self.flush()
                await asyncio.shield(self.handshake_done)
            return await self._exchange(message)
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def _exchange(self, message: bytes) -> bytes:
        session = self._session
        while not self.dead and session is not None and not self._may_open_stream(session):
            # Opening a stream beyond the peer's MAX_STREAMS would queue it inside
            # the engine (or fail), and cancelling it later would send frames for a
            # stream the peer never allowed (it closes with STREAM_LIMIT_ERROR).
            # Wait here: a query cancelled meanwhile leaves without a trace.
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._credit_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_credit_waiter()  # woken, then cancelled: pass the credit on
                raise
            finally:
                if not waiter.done():
                    self._credit_waiters.remove(waiter)
        if self.dead or session is None:
            raise ConnectionLost("connection is closed")
        if not self.handshake_done.done():
            self.info.early_data_sent = True
        try:
            stream_id = session.send_query(framing.frame(message))
        except SessionClosed as exc:
            lost = ConnectionLost(f"connection closed: {peer_text(str(exc))}")
            self._fail(lost)
            raise lost from None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = (framing.StreamReader(), future)
        self.flush()
        self._arm_watchdog(sending=True)
        try:
            return await future
        finally:
            if self._pending.pop(stream_id, None) is not None and not self.dead:
                # Cancelled (timeout) before the answer: tell the server to stop.
                session.cancel_stream(stream_id, framing.DoqError.REQUEST_CANCELLED)

    @staticmethod
    def _may_open_stream(session: ClientSession) -> bool:
        return session.streams_opened < session.stream_limit

    # --- liveness ------------------------------------------------------------

    def _wake_credit_waiter(self) -> None:
        waiters = self._credit_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @property
    def liveness_window(self) -> float:
        """Seconds the server may stay completely silent while a packet of ours
        awaits acknowledgement: ``dead_after``, or three PTOs on a slow path."""
        return max(self.dead_after, 3 * self.session.probe_timeout)

    def _arm_watchdog(self, *, sending: bool = False) -> None:
        """Notice a connection that died silently (a restarted server drops our
        packets without a reset), without mistaking a slow answer for death.

        Liveness is judged at the QUIC level: while queries are pending, some
        ack-eliciting packet of ours is always outstanding (a query, or else a
        PING sent for the purpose, at most one per window), and the server must
        acknowledge it. If not a
        single packet arrives from the server for a whole
        :attr:`liveness_window`, the connection is declared lost and its queries
        fail with :class:`ConnectionLost`, which the pool retries. A server that
        acknowledges is alive, however long its answers take.
        """
        if self._watchdog is not None or not self.handshake_complete or self.dead:
            return
        if not sending:  # else the query about to leave is the packet to acknowledge
            self.session.ping()
        self._heard_mark = self.last_heard
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.liveness_window, self._check_liveness)

    def _check_liveness(self) -> None:
        self._watchdog = None
        if self.dead or not self._pending or self._session is None:
            return
        if self.last_heard == self._heard_mark:
            window = self.liveness_window
            self._fail(ConnectionLost(f"no acknowledgement from the server for {window:.1f}s"))
            self._session.close(framing.DoqError.NO_ERROR, "unresponsive")
            return
        self._arm_watchdog()

    def _arm_handshake_timer(self) -> None:
        if self._handshake_timer is not None or self.handshake_done.done():
            return

        def expire() -> None:
            if not self.handshake_done.done():
                timeout = self.handshake_timeout
                self._fail(ConnectionLost(f"no handshake within {timeout:g}s (no reply)"))
                if self._session is not None:
                    self._session.close(framing.DoqError.NO_ERROR, "timeout")

        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.handshake_timeout, expire)

    # --- what the session reports (engine.SessionOwner) -----------------------

    def on_datagram(self) -> None:
        self.last_heard = time.monotonic()
        session = self._session
        if session is not None and session.stream_limit != self._known_limit:
            self._on_credit(session)

    def _on_credit(self, session: ClientSession) -> None:
        """The peer's stream limit changed: let waiting queries open their streams."""
        self._known_limit = session.stream_limit
        free = session.stream_limit - session.streams_opened
        waiters = self._credit_waiters
        while waiters and free > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
        if self._on_credit_change is not None:
            self._on_credit_change(self)

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        entry = self._pending.get(stream_id)
        if entry is None:
            return
        if self.info.first_byte_at is None:
            self.info.first_byte_at = time.monotonic()
        reader, future = entry
        try:
            message = reader.feed(data, end_stream)
            if message is not None:
                framing.check_doq_response(message)
        except framing.DoqProtocolError as exc:
            del self._pending[stream_id]
            future.set_exception(UpstreamError(f"bad DoQ answer: {exc}", Ede.INVALID_DATA))
            self.close(framing.DoqError.PROTOCOL_ERROR, str(exc))
            return
        if message is not None:
            del self._pending[stream_id]
            if not future.done():
                future.set_result(message)

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        entry = self._pending.pop(stream_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(UpstreamError(f"server reset the stream (code {error_code:#x})"))

    def on_handshake(self, alpn: str | None, resumed: bool, early_data_accepted: bool) -> None:
        if self.pins and not resumed:
            # A resumed session carries no certificate; its ticket came from a
            # connection that passed this check.
            try:
                server = getattr(self.configuration, "server_name", None) or self.address[0]
                check_pin(server, self.session.peer_certificate, self.pins)
            except PinMismatch as exc:
                self.session.close(framing.DoqError.PROTOCOL_ERROR, "pin mismatch")
                self._fail(exc)
                return
        info = self.info
        info.handshake_at = time.monotonic()
        info.alpn = alpn
        info.session_resumed = resumed
        if info.early_data_sent:
            info.early_data_accepted = early_data_accepted
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if not self.handshake_done.done():
            self.handshake_done.set_result(None)
        if self._pending:  # early-data queries, sent before the watchdog could run
            self._arm_watchdog()
        log.debug(
            "connected to %s: resumed=%s early_data=%s accepted=%s",
            self.address,
            info.session_resumed,
            info.early_data_sent,
            info.early_data_accepted,
        )

    def on_terminated(
        self, error_code: int, reason: str, *, draining: bool, engine_failure: bool = False
    ) -> None:
        if self.dead:
            return
        info = self.info
        info.close_code = error_code
        info.close_reason = reason
        info.close_by_peer = draining or error_code != 0 or "Idle" not in reason
        lost = ConnectionLost(describe_close(error_code, reason), Ede.NETWORK_ERROR)
        lost.engine_failure = engine_failure  # never from the reason: the server picks it
        self._fail(lost)

    def on_unreachable(self, reason: str) -> None:
        self._fail(ConnectionLost(f"connection failed: {reason}"))

    def _fail(self, exc: UpstreamError) -> None:
        if self.dead:
            return
        self.dead = True
        for timer in (self._watchdog, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        self._watchdog = self._handshake_timer = None
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc)
            self.handshake_done.exception()  # mark retrieved: nobody may be waiting
        pending, self._pending = self._pending, {}
        for _, future in pending.values():
            if not future.done():
                future.set_exception(exc)
        waiters, self._credit_waiters = self._credit_waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)  # the query then sees ``dead``
        if self._on_dead is not None:
            self._on_dead(self)


MAX_REASON = 120
"""Characters of a peer's close reason phrase that are kept."""


def peer_text(text: str) -> str:
    """A peer's ``text`` cut to :data:`MAX_REASON` characters, control characters as ``\\xNN``."""
    text = text[:MAX_REASON]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def describe_close(code: int, reason_phrase: str) -> str:
    """A connection close in words, for an EDE's EXTRA-TEXT.

    The reason phrase is the peer's text: it is cut to :data:`MAX_REASON` characters
    and its control characters are shown as ``\\xNN``, since it reaches logs,
    terminals and the last-error metric."""
    phrase = peer_text(reason_phrase)
    reason = f": {phrase}" if phrase else ""
    if 0x100 <= code <= 0x1FF:
        return f"TLS handshake failed (alert {code - 0x100}){reason}"
    if code == 0 and "Idle" in reason_phrase:
        return "connection idle timeout"
    return f"connection closed (code {code:#x}){reason}"


def client_configuration(
    server_name: str,
    *,
    ca_file: str | None,
    idle_timeout: float = 30.0,
    quic_engine: str | None = None,
    **extra: Any,
) -> Any:
    """A strict-verification client configuration for DoQ, for the given engine."""
    return engine.get(quic_engine).client_configuration(
        server_name, ca_file=ca_file, idle_timeout=idle_timeout, **extra
    )


def warm_up(configuration: Any, quic_engine: str | None = None) -> None:
    """Build and discard one first flight without sending it (the first handshake of
    a process otherwise pays about 2.5 ms for code run for the first time)."""
    engine.get(quic_engine).warm_up(configuration)
