"""The qh3 engine (optional): a client QUIC session on qh3, aioquic's fork with a Rust core.

qh3 keeps aioquic's sans-I/O API, so this mirrors :mod:`engine_aioquic` without
its internals: the stream limit and the packets in flight come from qh3's core.
Sends are batched the same way (one transmit per connection per event-loop turn)
and ACKs ride on queries, but by other means: qh3's core asks to ACK every
1-RTT packet at once and has no knob for it, so the engine decides when to ask
the core for datagrams instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import qh3
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicErrorCode
from qh3.tls import CipherSuite, SessionTicket

from doqproxy.doq import framing
from doqproxy.upstream.engine import (
    ENGINE_FAILURE,
    ConnectedTransport,
    SessionClosed,
    SessionOwner,
)
from doqproxy.upstream.engine_qh3_io import LeanProtocol
from doqproxy.upstream.qh3_reservations import ReservationSafeConnection

NAME = "qh3"
NAIVE_TICKET_DATES = True
"""Whether session tickets carry naive UTC dates (qh3) or aware ones (aioquic)."""
__all__ = [
    "NAIVE_TICKET_DATES",
    "NAME",
    "CipherSuite",
    "SessionTicket",
    "client_configuration",
    "new_session",
    "warm_up",
]

ACK_DELAY = 0.005
"""Seconds an ACK for 1-RTT packets may wait for a query to ride on, once the
handshake is confirmed (as in :mod:`engine_aioquic`). We advertise max_ack_delay
25 ms (qh3's default), so this stays well inside what RFC 9000 13.2.1 allows."""


def version() -> str:
    return str(qh3.__version__)


class _Protocol(LeanProtocol):
    """Moves datagrams between the socket and qh3; events go to the owner."""

    owner: SessionOwner
    _quic: ReservationSafeConnection
    connected: ConnectedTransport | None = None
    received = 0
    _ack_flush: asyncio.TimerHandle | None = None
    """The deferred transmit that sends a pending ACK if no query takes it first."""
    failed = False
    """Whether qh3's core failed (see :meth:`_fail`); nothing is sent or read then."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected = ConnectedTransport(cast(asyncio.DatagramTransport, transport))
        super().connection_made(cast(asyncio.BaseTransport, self.connected))
        self._sendto_many = None  # one sendto per datagram, through the counter

    def quic_event_received(self, event: Any) -> None:
        owner = self.owner
        if isinstance(event, events.StreamDataReceived):
            owner.on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            owner.on_stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            owner.on_handshake(
                event.alpn_protocol, bool(event.session_resumed), bool(event.early_data_accepted)
            )
        elif isinstance(event, events.ConnectionTerminated):
            owner.on_terminated(event.error_code, event.reason_phrase, draining=False)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.failed:
            return
        self.received += 1
        quic = self._quic
        now = self._loop.time()
        core = quic._core
        lost = 0 if core is None else core.loss_total
        try:
            self.receive(cast(bytes, data), addr, now)
        except (ValueError, QuicConnectionError) as exc:
            self._fail(str(exc))  # as in transmit(): the core cannot go on
            return
        self._process_events()
        if not quic._handshake_confirmed:
            self.transmit()  # the handshake's next flight leaves at once
        elif core is not None and core.loss_total != lost:
            self._transmit_soon()  # resend what this ACK showed lost now, not later
        elif quic.prepared:
            self._transmit_soon()  # built while the datagram was taken (qh3_reservations)
        elif self._transmit_task is None and self._ack_flush is None:
            # All that is due is the ACK: give a query ACK_DELAY to carry it. Anything
            # that transmits meanwhile (a query, a timer, a cancel) takes it along.
            self._ack_flush = self._loop.call_at(now + ACK_DELAY, self.transmit)
        close = quic._close_event
        # qh3's wrapper has no closing or draining state (unlike aioquic's): it only
        # turns TERMINATED after the draining period. A close event, the peer's or a
        # protocol error's, means the connection carries nothing more from now on.
        if close is not None:
            self.owner.on_terminated(close.error_code, close.reason_phrase, draining=True)
        else:
            self.owner.on_datagram()

    def _transmit_soon(self) -> None:
        if self._transmit_task is None:
            self._transmit_task = self._loop.call_soon(self.transmit)

    def _handle_timer(self) -> None:
        if self.failed:
            return
        try:
            super()._handle_timer()
        except (ValueError, QuicConnectionError) as exc:
            self._fail(str(exc))

    def _cancel_ack_flush(self) -> None:
        flush = self._ack_flush
        if flush is not None:
            self._ack_flush = None
            flush.cancel()

    def transmit(self) -> None:
        self._cancel_ack_flush()
        if self.failed:
            return
        try:
            super().transmit()
        except (ValueError, QuicConnectionError) as exc:
            self._fail(str(exc))

    def _fail(self, reason: str) -> None:
        """qh3's core failed to build packets: the connection can send nothing more.

        qh3 2.1.0 does this ("reserved stream is missing") when a stream completes
        while a resend of its data (after a PTO) waits, already reserved, for the
        congestion window to open. The packet being built is dropped, with the data
        of other streams that the core now counts as sent: those queries never
        reach the server. :mod:`qh3_reservations` keeps that state from arising;
        this is the safety net for any other core failure: the connection is ended
        here, at once, so its queries fail over (the pool retries them) instead of
        waiting for their timeout.
        """
        self.failed = True
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        self._closed.set()
        if self._transport is not None:
            self._transport.close()
        self.owner.on_terminated(
            QuicErrorCode.INTERNAL_ERROR,
            f"{ENGINE_FAILURE}: {reason}",
            draining=False,
            engine_failure=True,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_ack_flush()
        super().connection_lost(exc)

    def error_received(self, exc: Exception) -> None:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.owner.on_unreachable(reason)


class Qh3Session:
    """A :class:`~doqproxy.upstream.engine.ClientSession` on qh3."""

    def __init__(
        self,
        owner: SessionOwner,
        configuration: QuicConfiguration,
        *,
        ticket_handler: Callable[[Any], None] | None = None,
        token_handler: Callable[[bytes], None] | None = None,
    ) -> None:
        self._owner = owner
        self._configuration = configuration
        self.quic = ReservationSafeConnection(
            configuration=configuration, session_ticket_handler=ticket_handler
        )
        self._protocol: _Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None

    async def open(self, address: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        quic = self.quic
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Protocol(quic), family=family, remote_addr=address
        )
        self._transport = transport
        self._protocol = protocol
        protocol.owner = self._owner
        peer = transport.get_extra_info("peername") or address
        quic.connect(tuple(peer), now=loop.time())  # the first flight waits for a flush

    def transmit_soon(self) -> None:
        if self._protocol is not None:
            self._protocol._transmit_soon()

    def send_query(self, data: bytes) -> int:
        quic = self.quic
        stream_id = quic.get_next_available_stream_id()
        try:
            quic.send_stream_data(stream_id, data, end_stream=True)
        except QuicConnectionError as exc:  # the peer closed; the event has not surfaced
            raise SessionClosed(exc.reason_phrase or str(exc)) from None
        return stream_id

    def cancel_stream(self, stream_id: int, error_code: int) -> None:
        quic = self.quic
        try:
            quic.reset_stream(stream_id, error_code)
            quic.stop_stream(stream_id, error_code)
        except Exception:
            pass
        self.transmit_soon()

    def ping(self) -> None:
        self.quic.send_ping(0)
        self.transmit_soon()

    def close(self, error_code: int, reason: str) -> None:
        self.quic.close(error_code=error_code, reason_phrase=reason)
        if self._protocol is not None:
            self._protocol.transmit()

    async def wait_closed(self, grace: float) -> None:
        if self._protocol is not None:
            try:
                async with asyncio.timeout(grace):
                    await self._protocol.wait_closed()
            except TimeoutError:
                pass
        if self._transport is not None:
            self._transport.close()

    def abandon(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def stream_limit(self) -> int:
        quic = self.quic
        core = quic._core
        if core is None or not (quic._handshake_complete or quic._transport_parameters_applied):
            remembered = quic._remembered_transport_parameters()
            return 0 if remembered is None else int(remembered.initial_max_streams_bidi or 0)
        return int(core.stream_limits[0])  # the peer's MAX_STREAMS for bidirectional streams

    @property
    def streams_opened(self) -> int:
        return int(self.quic.get_next_available_stream_id() // 4)

    @property
    def probe_timeout(self) -> float:
        core = self.quic._core
        srtt = None if core is None else core.smoothed_rtt
        return 0.2 if srtt is None else 2 * srtt + 0.025

    @property
    def smoothed_rtt(self) -> float | None:
        core = self.quic._core
        return None if core is None else core.smoothed_rtt

    @property
    def idle_timeout(self) -> float:
        return float(self._configuration.idle_timeout)

    def restart_idle_timer(self) -> None:
        pass  # qh3's core counts from its last activity; a prepared flight sent nothing

    @property
    def datagrams(self) -> tuple[int, int]:
        protocol = self._protocol
        if protocol is None or protocol.connected is None:
            return 0, 0
        return protocol.connected.sent, protocol.received

    @property
    def cipher(self) -> str | None:
        suite = self.quic.get_cipher()
        return None if suite is None else "TLS_" + suite.name

    @property
    def peer_certificate(self) -> Any:
        certificate = self.quic.get_peercert()
        return None if certificate is None else certificate.public_bytes()


def new_session(
    owner: SessionOwner,
    configuration: QuicConfiguration,
    *,
    ticket_handler: Callable[[Any], None] | None,
    token_handler: Callable[[bytes], None] | None,
) -> Qh3Session:
    return Qh3Session(owner, configuration, ticket_handler=ticket_handler)


def warm_up(configuration: QuicConfiguration) -> None:
    """Build and discard one first flight, without sending it."""
    quic = QuicConnection(configuration=dataclasses.replace(configuration))
    quic.connect(("127.0.0.1", 853), now=time.monotonic())
    quic.datagrams_to_send(now=time.monotonic())


def client_configuration(
    server_name: str,
    *,
    ca_file: str | None,
    idle_timeout: float = 30.0,
    **extra: Any,
) -> QuicConfiguration:
    """A strict-verification client configuration for DoQ.

    Path MTU discovery is off: it costs three probes of up to 1,472 octets on every
    new connection, and DNS queries never need more than the 1,200 octets QUIC
    always allows (answers are sized by the server's own path).
    """
    extra.setdefault("probe_datagram_size", False)
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
    # else qh3 loads the system trust store itself (ssl's default certificates)
    return configuration
