"""The aioquic engine: a client QUIC session on aioquic 1.7, with its workarounds.

Everything here touches aioquic, internals included (checked against 1.7.x; the
pin in pyproject.toml says so): the 0-RTT fixes (Retry, rejected early data),
the connected-socket address fix, batched sends with ACKs riding on queries,
and the stream-credit and loss-recovery figures the DoQ client judges by.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import aioquic
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicPacketType
from aioquic.tls import CipherSuite, Epoch, SessionTicket

from doqproxy.doq import framing
from doqproxy.upstream.engine import ConnectedTransport, SessionOwner

NAME = "aioquic"
NAIVE_TICKET_DATES = False
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
handshake is done (aioquic's own is 1 ms; we advertise max_ack_delay 25 ms). Any
packet we send in the meantime carries it, so a busy connection sends few
ACK-only datagrams."""

_END_STATES = (
    QuicConnectionState.CLOSING,
    QuicConnectionState.DRAINING,
    QuicConnectionState.TERMINATED,
)


def version() -> str:
    return str(aioquic.__version__)


class _ClientQuicConnection(QuicConnection):
    """A QuicConnection that never strands 0-RTT data and lets ACKs ride on queries.

    aioquic 1.7 forgets early-data packets in two cases: when the server answers
    with Retry (the packet spaces are rebuilt, so the 0-RTT packets are neither
    acknowledged nor declared lost) and when the server rejects early data (they
    are only resent after loss detection, about one RTT later). Both are fixed by
    declaring those packets lost at once, which requeues their stream data.
    """

    _ack_with_data = False

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

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super().send_stream_data(stream_id, data, end_stream)
        self._ack_with_data = True

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        if self._ack_with_data:
            # A query is going out anyway: let a pending ACK ride along now rather
            # than in an ACK-only datagram when its delay runs out.
            self._ack_with_data = False
            space = self._spaces[Epoch.ONE_RTT]
            if space.ack_at is not None and space.ack_at > now:
                space.ack_at = now
        return super().datagrams_to_send(now)

    def delay_acks(self, delay: float) -> None:
        """Let 1-RTT ACKs wait up to ``delay`` seconds for a packet to ride on."""
        self._ack_delay = delay


class _Protocol(QuicConnectionProtocol):
    """Moves datagrams between the socket and aioquic; events go to the owner."""

    owner: SessionOwner
    connected: ConnectedTransport | None = None
    received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected = ConnectedTransport(cast(asyncio.DatagramTransport, transport))
        super().connection_made(cast(asyncio.BaseTransport, self.connected))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # Deliberately no super(): the default keeps a StreamReader per stream forever.
        owner = self.owner
        if isinstance(event, events.StreamDataReceived):
            owner.on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            owner.on_stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            if not event.early_data_accepted:
                # Resend rejected early data now, not after loss detection.
                quic = cast(_ClientQuicConnection, self._quic)
                quic.requeue_early_data(time.monotonic())
                self._transmit_soon()
            cast(_ClientQuicConnection, self._quic).delay_acks(ACK_DELAY)
            owner.on_handshake(
                event.alpn_protocol, bool(event.session_resumed), bool(event.early_data_accepted)
            )
        elif isinstance(event, events.ConnectionTerminated):
            owner.on_terminated(event.error_code, event.reason_phrase, draining=False)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self.received += 1
        quic = self._quic
        quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
        self._process_events()
        if quic._handshake_confirmed:
            # One transmit per event-loop turn: the ACKs for every datagram read in
            # this turn, and the queries written meanwhile, share packets.
            self._transmit_soon()
        else:
            self.transmit()  # the handshake's next flight leaves at once
        owner = self.owner
        # A peer's CONNECTION_CLOSE only surfaces after the draining period; look now.
        close = quic._close_event
        if quic._state in _END_STATES and close is not None:
            owner.on_terminated(close.error_code, close.reason_phrase, draining=True)
        else:
            owner.on_datagram()

    def error_received(self, exc: Exception) -> None:
        # ICMP port/host unreachable: fail fast instead of waiting for the timeout.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.owner.on_unreachable(reason)


class AioquicSession:
    """A :class:`~doqproxy.upstream.engine.ClientSession` on aioquic."""

    def __init__(
        self,
        owner: SessionOwner,
        configuration: QuicConfiguration,
        *,
        ticket_handler: Callable[[SessionTicket], None] | None = None,
        token_handler: Callable[[bytes], None] | None = None,
    ) -> None:
        self._owner = owner
        self.quic = _ClientQuicConnection(
            configuration=configuration,
            session_ticket_handler=ticket_handler,
            token_handler=token_handler,
        )
        self._protocol: _Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None

    async def open(self, address: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        quic = self.quic
        transport, protocol = await loop.create_datagram_endpoint(
            # A connected socket: the kernel then reports ICMP port/host unreachable,
            # so a dead upstream fails fast instead of at the query timeout.
            lambda: _Protocol(quic),
            family=family,
            remote_addr=address,
        )
        self._transport = transport
        self._protocol = protocol
        protocol.owner = self._owner
        # Datagrams arrive from the kernel's form of the address (a 4-tuple for
        # IPv6); aioquic matches them against the address it connected to.
        peer = transport.get_extra_info("peername") or address
        protocol.connect(tuple(peer), transmit=False)

    def transmit_soon(self) -> None:
        if self._protocol is not None:
            self._protocol._transmit_soon()

    def send_query(self, data: bytes) -> int:
        quic = self.quic
        stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, data, end_stream=True)
        return stream_id

    def cancel_stream(self, stream_id: int, error_code: int) -> None:
        quic = self.quic
        if stream_id // 4 >= quic._remote_max_streams_bidi:
            return  # never allowed by the peer, so never sent: nothing to cancel
        try:
            quic.reset_stream(stream_id, error_code)
            quic.stop_stream(stream_id, error_code)
        except Exception:
            pass  # the stream already ended on that side
        self.transmit_soon()

    def ping(self) -> None:
        self.quic.send_ping(0)
        self.transmit_soon()

    def close(self, error_code: int, reason: str) -> None:
        if self._protocol is not None:
            self._protocol.close(error_code=error_code, reason_phrase=reason)

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
        return self.quic._remote_max_streams_bidi

    @property
    def streams_opened(self) -> int:
        return self.quic._local_next_stream_id_bidi // 4

    @property
    def probe_timeout(self) -> float:
        return self.quic._loss.get_probe_timeout()

    @property
    def smoothed_rtt(self) -> float | None:
        loss = self.quic._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    @property
    def idle_timeout(self) -> float:
        return self.quic._idle_timeout()

    def restart_idle_timer(self) -> None:
        now = asyncio.get_running_loop().time()  # aioquic's clock is the loop's
        self.quic._close_at = now + self.quic._idle_timeout()

    @property
    def datagrams(self) -> tuple[int, int]:
        protocol = self._protocol
        if protocol is None or protocol.connected is None:
            return 0, 0
        return protocol.connected.sent, protocol.received

    @property
    def peer_certificate(self) -> Any:
        return self.quic.tls._peer_certificate

    @property
    def cipher(self) -> str | None:
        schedule = self.quic.tls.key_schedule
        return None if schedule is None else "TLS_" + schedule.cipher_suite.name


def new_session(
    owner: SessionOwner,
    configuration: QuicConfiguration,
    *,
    ticket_handler: Callable[[SessionTicket], None] | None,
    token_handler: Callable[[bytes], None] | None,
) -> AioquicSession:
    return AioquicSession(
        owner, configuration, ticket_handler=ticket_handler, token_handler=token_handler
    )


def warm_up(configuration: QuicConfiguration) -> None:
    """Build and discard one first flight, without sending it.

    The first handshake of a process pays for code paths run for the first time
    (TLS message builders, OpenSSL's first use of each primitive): about 2.5 ms
    that would otherwise land on the first query after a restart.
    """
    quic = _ClientQuicConnection(configuration=dataclasses.replace(configuration))
    quic.connect(("127.0.0.1", 853), now=time.monotonic())
    quic.datagrams_to_send(now=time.monotonic())


def client_configuration(
    server_name: str,
    *,
    ca_file: str | None,
    idle_timeout: float = 30.0,
    **extra: Any,
) -> QuicConfiguration:
    """A strict-verification client configuration for DoQ."""
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
