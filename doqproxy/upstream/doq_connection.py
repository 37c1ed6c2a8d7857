"""One DNS-over-QUIC client connection: a thin asyncio adapter over aioquic.

:class:`DoqConnection` opens the UDP endpoint itself (so that it can use its own
``QuicConnection`` subclass), sends each query on a fresh bidirectional stream
and resolves a future when the answer's stream ends. Queries written before the
handshake completes go out as 0-RTT early data when a session ticket allows it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicPacketType
from aioquic.tls import Epoch, SessionTicket

from doqproxy.dns.ede import Ede
from doqproxy.doq import framing
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.pins import PinMismatch, check_pin

log = logging.getLogger(__name__)

_END_STATES = (
    QuicConnectionState.CLOSING,
    QuicConnectionState.DRAINING,
    QuicConnectionState.TERMINATED,
)


UNKNOWN_STREAM_CREDIT = 10
"""Streams assumed allowed on a connection whose peer limit is not known yet (no
ticket carried it and the handshake is not done): a small guess, so that a
burst on a cold pool spreads over connections instead of queueing behind a
limit that may be lower than ours."""


class ConnectionLost(UpstreamError):
    """The connection died before the answer arrived; the query may be retried."""


class _ClientQuicConnection(QuicConnection):
    """A QuicConnection that never strands 0-RTT data.

    aioquic 1.7 forgets early-data packets in two cases: when the server answers
    with Retry (the packet spaces are rebuilt, so the 0-RTT packets are neither
    acknowledged nor declared lost) and when the server rejects early data (they
    are only resent after loss detection, about one RTT later). Both are fixed by
    declaring those packets lost at once, which requeues their stream data.
    """

    def _connect(self, now: float) -> None:
        if self._retry_count:
            self.requeue_early_data(now)
        super()._connect(now)

    def requeue_early_data(self, now: float) -> None:
        space = self._spaces[Epoch.ONE_RTT]
        early = [
            packet
            for packet in space.sent_packets.values()
            if packet.packet_type == QuicPacketType.ZERO_RTT
        ]
        if early:
            self._loss._on_packets_lost(now=now, packets=early, space=space, congestion_event=False)


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


class _ConnectedTransport:
    """A connected UDP transport that sends without an address.

    aioquic passes its peer address to every ``sendto``. On a connected socket
    uvloop accepts only ``None`` or the exact 4-tuple it connected to (an IPv6
    peer is ``(host, port, flowinfo, scope_id)``), and asyncio only the address
    it resolved, so the address is dropped here: the kernel knows the peer.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport

    def sendto(self, data: bytes, addr: object = None) -> None:
        self._transport.sendto(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Protocol(QuicConnectionProtocol):
    """Routes aioquic events to the owning :class:`DoqConnection`."""

    owner: DoqConnection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connected = _ConnectedTransport(cast(asyncio.DatagramTransport, transport))
        super().connection_made(cast(asyncio.BaseTransport, connected))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # Deliberately no super(): the default keeps a StreamReader per stream forever.
        self.owner._on_event(event)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        super().datagram_received(data, addr)
        owner = self.owner
        owner.last_heard = time.monotonic()
        # A peer's CONNECTION_CLOSE only surfaces after the draining period; look now.
        quic = self._quic
        if quic._state in _END_STATES and quic._close_event is not None:
            owner._on_terminated(quic._close_event, draining=True)
        elif quic._remote_max_streams_bidi != owner._known_max_streams:
            owner._on_credit()

    def error_received(self, exc: Exception) -> None:
        # ICMP port/host unreachable: fail fast instead of waiting for the timeout.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.owner._fail(ConnectionLost(f"connection failed: {reason}"))


class DoqConnection:
    """One QUIC connection to a DoQ server, carrying many concurrent queries."""

    def __init__(
        self,
        address: tuple[str, int],
        configuration: QuicConfiguration,
        *,
        ticket_handler: Callable[[SessionTicket], None] | None = None,
        token_handler: Callable[[bytes], None] | None = None,
        on_dead: Callable[[DoqConnection], None] | None = None,
        on_credit: Callable[[DoqConnection], None] | None = None,
    ) -> None:
        self.address = address
        self._on_dead = on_dead
        self._on_credit_change = on_credit
        self.configuration = configuration
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
        self._known_max_streams = 0
        self._credit_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.handshake_timeout = 5.0
        """Seconds from the first flight to a completed handshake before giving up
        (an upstream that drops our packets without an ICMP error)."""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.pins: tuple[str, ...] = ()
        """Accepted SPKI SHA-256 pins (base64); empty means no pinning."""
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, tuple[framing.StreamReader, asyncio.Future[bytes]]] = {}
        self._ticket_handler = ticket_handler
        self._token_handler = token_handler
        self._protocol: _Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None

    # --- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create the socket and prepare the handshake. The first flight waits for
        :meth:`query` or :meth:`flush`, so that a query can ride along as 0-RTT."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        quic = _ClientQuicConnection(
            configuration=self.configuration,
            session_ticket_handler=self._ticket_handler,
            token_handler=self._token_handler,
        )
        transport, protocol = await loop.create_datagram_endpoint(
            # A connected socket: the kernel then reports ICMP port/host unreachable,
            # so a dead upstream fails fast instead of at the query timeout.
            lambda: _Protocol(quic),
            family=family,
            remote_addr=self.address,
        )
        self._transport = transport
        self._protocol = protocol
        self._protocol.owner = self
        # Datagrams arrive from the kernel's form of the address (a 4-tuple for
        # IPv6); aioquic matches them against the address it connected to.
        peer = transport.get_extra_info("peername") or self.address
        self._protocol.connect(tuple(peer), transmit=False)
        self._known_max_streams = quic._remote_max_streams_bidi
        self.info.opened_at = time.monotonic()

    @property
    def quic(self) -> QuicConnection:
        assert self._protocol is not None
        return self._protocol._quic

    @property
    def usable(self) -> bool:
        return not self.dead and self._protocol is not None

    @property
    def resumable(self) -> bool:
        """A session ticket was given, so early data can go in the first flight."""
        return self.configuration.session_ticket is not None

    def close(self, code: int = framing.DoqError.NO_ERROR, reason: str = "") -> None:
        """Close with a DoQ error code; pending queries fail with :class:`ConnectionLost`."""
        if self._protocol is not None and not self.dead:
            self._protocol.close(error_code=code, reason_phrase=reason)
        self._fail(ConnectionLost(f"connection closed locally ({reason or 'shutdown'})"))

    async def wait_closed(self, grace: float = 1.0) -> None:
        """Wait until aioquic has sent the close, then release the socket."""
        if self._protocol is not None:
            try:
                async with asyncio.timeout(grace):
                    await self._protocol.wait_closed()
            except TimeoutError:
                pass
        if self._transport is not None:
            self._transport.close()

    # --- queries -----------------------------------------------------------

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
        if self._protocol is None:
            return 0
        quic = self._protocol._quic
        limit = quic._remote_max_streams_bidi
        if not limit and not self.handshake_done.done():
            limit = UNKNOWN_STREAM_CREDIT
        waiting = self.in_flight - len(self._pending)
        return limit - quic._local_next_stream_id_bidi // 4 - max(0, waiting)

    def _has_stream_credit(self) -> bool:
        quic = self.quic
        return quic._local_next_stream_id_bidi // 4 < quic._remote_max_streams_bidi

    @property
    def idle_timeout(self) -> float:
        """The negotiated idle timeout: min(ours, the peer's), at least 3 PTO."""
        return self.quic._idle_timeout() if self._protocol is not None else 0.0

    async def query(self, message: bytes, *, early: bool = True) -> bytes:
        """Send one DNS message on a new stream and return the answer's message.

        Before the handshake completes the message rides as 0-RTT early data when
        a ticket allows it and ``early`` is true; otherwise it waits for the
        handshake (non-replayable messages must never go as early data).
        """
        if self.dead or self._protocol is None:
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
        while not self.dead and self._protocol is not None and not self._has_stream_credit():
            # Opening a stream beyond the peer's MAX_STREAMS would queue it inside
            # aioquic, and cancelling it later would send frames for a stream the
            # peer never allowed (it closes with STREAM_LIMIT_ERROR). Wait here: a
            # query cancelled meanwhile leaves without a trace.
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
        if self.dead or self._protocol is None:
            raise ConnectionLost("connection is closed")
        quic = self._protocol._quic
        stream_id = quic.get_next_available_stream_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = (framing.StreamReader(), future)
        if not self.handshake_done.done():
            self.info.early_data_sent = True
        quic.send_stream_data(stream_id, framing.frame(message), end_stream=True)
        self.flush()
        self._arm_watchdog()
        try:
            return await future
        finally:
            if self._pending.pop(stream_id, None) is not None and not self.dead:
                # Cancelled (timeout) before the answer: tell the server to stop.
                self._cancel_stream(stream_id)

    def _on_credit(self) -> None:
        """The peer's stream limit changed: let waiting queries open their streams."""
        quic = self.quic
        self._known_max_streams = quic._remote_max_streams_bidi
        free = quic._remote_max_streams_bidi - quic._local_next_stream_id_bidi // 4
        waiters = self._credit_waiters
        while waiters and free > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
        if self._on_credit_change is not None:
            self._on_credit_change(self)

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
        return max(self.dead_after, 3 * self.quic._loss.get_probe_timeout())

    def _arm_watchdog(self) -> None:
        """Notice a connection that died silently (a restarted server drops our
        packets without a reset), without mistaking a slow answer for death.

        Liveness is judged at the QUIC level: while queries are pending, some
        ack-eliciting packet of ours is always outstanding (a query, or else a
        PING sent for the purpose), and the server must acknowledge it. If not a
        single packet arrives from the server for a whole
        :attr:`liveness_window`, the connection is declared lost and its queries
        fail with :class:`ConnectionLost`, which the pool retries. A server that
        acknowledges is alive, however long its answers take.
        """
        if self._watchdog is not None or not self.handshake_complete or self.dead:
            return
        self._ensure_outstanding()
        self._heard_mark = self.last_heard
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.liveness_window, self._check_liveness)

    def _ensure_outstanding(self) -> None:
        """Send a PING unless an ack-eliciting packet already awaits its ACK."""
        quic = self.quic
        if not quic._spaces[Epoch.ONE_RTT].ack_eliciting_in_flight:
            quic.send_ping(0)
            assert self._protocol is not None
            self._protocol.transmit()

    def _check_liveness(self) -> None:
        self._watchdog = None
        if self.dead or not self._pending or self._protocol is None:
            return
        if self.last_heard == self._heard_mark:
            window = self.liveness_window
            self._fail(ConnectionLost(f"no acknowledgement from the server for {window:.1f}s"))
            self._protocol.close(error_code=framing.DoqError.NO_ERROR, reason_phrase="unresponsive")
            return
        self._arm_watchdog()

    def restart_idle_timer(self) -> None:
        """Count the idle timeout from now: a prepared connection may have waited."""
        if self._protocol is not None:
            now = asyncio.get_running_loop().time()  # aioquic's clock is the loop's
            self._protocol._quic._close_at = now + self.idle_timeout

    def abandon(self) -> None:
        """Drop a connection that never sent anything: no close is due to anyone."""
        self.dead = True
        if self._transport is not None:
            self._transport.close()

    def flush(self) -> None:
        """Send whatever is pending, the first flight included."""
        if self._protocol is not None:
            self._protocol.transmit()
            self._arm_handshake_timer()

    def _arm_handshake_timer(self) -> None:
        if self._handshake_timer is not None or self.handshake_done.done():
            return

        def expire() -> None:
            if not self.handshake_done.done():
                timeout = self.handshake_timeout
                self._fail(ConnectionLost(f"no handshake within {timeout:g}s (no reply)"))
                if self._protocol is not None:
                    self._protocol.close(
                        error_code=framing.DoqError.NO_ERROR, reason_phrase="timeout"
                    )

        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.handshake_timeout, expire)

    def ping(self) -> None:
        """Send a PING (for the opt-in keepalive)."""
        if self._protocol is not None and not self.dead:
            self._protocol._quic.send_ping(0)
            self._protocol.transmit()

    def _cancel_stream(self, stream_id: int) -> None:
        assert self._protocol is not None
        quic = self._protocol._quic
        if stream_id // 4 >= quic._remote_max_streams_bidi:
            return  # never allowed by the peer, so never sent: nothing to cancel
        try:
            quic.reset_stream(stream_id, framing.DoqError.REQUEST_CANCELLED)
            quic.stop_stream(stream_id, framing.DoqError.REQUEST_CANCELLED)
        except Exception:
            pass
        self._protocol.transmit()

    # --- events ------------------------------------------------------------

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event)
        elif isinstance(event, events.StreamReset):
            entry = self._pending.pop(event.stream_id, None)
            if entry is not None and not entry[1].done():
                entry[1].set_exception(
                    UpstreamError(f"server reset the stream (code {event.error_code:#x})")
                )
        elif isinstance(event, events.HandshakeCompleted):
            self._on_handshake(event)
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event, draining=False)

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        entry = self._pending.get(event.stream_id)
        if entry is None:
            return
        if self.info.first_byte_at is None:
            self.info.first_byte_at = time.monotonic()
        reader, future = entry
        try:
            message = reader.feed(event.data, event.end_stream)
            if message is not None:
                framing.check_doq_response(message)
        except framing.DoqProtocolError as exc:
            del self._pending[event.stream_id]
            future.set_exception(UpstreamError(f"bad DoQ answer: {exc}", Ede.INVALID_DATA))
            self.close(framing.DoqError.PROTOCOL_ERROR, str(exc))
            return
        if message is not None:
            del self._pending[event.stream_id]
            if not future.done():
                future.set_result(message)

    def _on_handshake(self, event: events.HandshakeCompleted) -> None:
        if self.pins and not event.session_resumed:
            # A resumed session carries no certificate; its ticket came from a
            # connection that passed this check.
            try:
                server = self.configuration.server_name or self.address[0]
                check_pin(server, self.quic.tls._peer_certificate, self.pins)
            except PinMismatch as exc:
                if self._protocol is not None:
                    self._protocol.close(error_code=0x2, reason_phrase="pin mismatch")
                self._fail(exc)
                return
        info = self.info
        info.handshake_at = time.monotonic()
        info.alpn = event.alpn_protocol
        info.session_resumed = event.session_resumed
        if info.early_data_sent:
            info.early_data_accepted = event.early_data_accepted
            if not event.early_data_accepted:
                # Resend the rejected early data now, not after loss detection.
                quic = cast(_ClientQuicConnection, self.quic)
                quic.requeue_early_data(time.monotonic())
                assert self._protocol is not None
                self._protocol._transmit_soon()
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

    def _on_terminated(self, event: events.ConnectionTerminated, *, draining: bool) -> None:
        if self.dead:
            return
        info = self.info
        info.close_code = event.error_code
        info.close_reason = event.reason_phrase
        info.close_by_peer = draining or event.error_code != 0 or "Idle" not in event.reason_phrase
        self._fail(ConnectionLost(_describe_close(event), Ede.NETWORK_ERROR))

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


def warm_up(configuration: QuicConfiguration) -> None:
    """Build and discard one first flight, without sending it.

    The first handshake of a process pays for code paths run for the first time
    (TLS message builders, OpenSSL's first use of each primitive): about 2.5 ms
    that would otherwise land on the first query after a restart.
    """
    quic = _ClientQuicConnection(configuration=dataclasses.replace(configuration))
    quic.connect(("127.0.0.1", 853), now=time.monotonic())
    quic.datagrams_to_send(now=time.monotonic())


def _describe_close(event: events.ConnectionTerminated) -> str:
    code = event.error_code
    reason = f": {event.reason_phrase}" if event.reason_phrase else ""
    if 0x100 <= code <= 0x1FF:
        return f"TLS handshake failed (alert {code - 0x100}){reason}"
    if code == 0 and "Idle" in event.reason_phrase:
        return "connection idle timeout"
    return f"connection closed (code {code:#x}){reason}"


def client_configuration(
    server_name: str,
    *,
    ca_file: str | None,
    idle_timeout: float = 30.0,
    **extra: Any,
) -> QuicConfiguration:
    """A strict-verification client configuration for DoQ."""
    import ssl

    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[framing.ALPN],
        server_name=server_name,
        verify_mode=ssl.CERT_REQUIRED,
        idle_timeout=idle_timeout,
        **extra,
    )
    if ca_file is not None:
        configuration.load_verify_locations(cafile=ca_file)
        return configuration
    # The system trust store, as OpenSSL is configured to find it.
    paths = ssl.get_default_verify_paths()
    if paths.cafile:
        configuration.load_verify_locations(cafile=paths.cafile)
    else:
        configuration.load_verify_locations(capath=paths.capath or paths.openssl_capath)
    return configuration
