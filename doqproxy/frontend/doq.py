"""The DNS-over-QUIC front end (RFC 9250): QUIC streams in, :class:`Resolver` answers out.

It only moves bytes between aioquic and the resolver. The DoQ rules live in
:mod:`doqproxy.doq.framing` (framing) and :mod:`doqproxy.doq.server_rules` (what to do with a
complete query). Per connection:

- each client-initiated bidirectional stream carries one query; the answer goes
  back length-prefixed, then FIN;
- a query gets ``stream_timeout`` seconds to arrive whole with its FIN. A stream
  that stalls is stopped and reset with DOQ_REQUEST_CANCELLED; nothing else
  waits for it (CoreDNS advisory GHSA-f2c9-fp4w-rhw6);
- protocol violations close the connection with DOQ_PROTOCOL_ERROR;
- at most ``max_streams`` streams are open at once: the client's extra streams
  wait for credit, which comes back as streams finish (MAX_STREAMS);
- new connections are weighed before any TLS work (:mod:`doqproxy.doq.admission`,
  :mod:`doqproxy.frontend.doq_guard`): caps on established connections, on
  half-open handshakes, per client address and per prefix; a refusal is a bare
  CONNECTION_REFUSED close, and past a number of half-open handshakes new
  clients must answer a Retry first;
- a handshake gets ``handshake_timeout`` seconds (not the idle timeout) to
  complete; then the connection is closed and its slot freed;
- NOTIFY is answered REFUSED unless the client is in ``notify_from``;
- shutdown closes every connection with DOQ_NO_ERROR; an idle timeout closes
  silently, as QUIC does.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from doqproxy.dns import rewrite
from doqproxy.doq import framing, server_rules
from doqproxy.doq.admission import Admission, AdmissionLimits
from doqproxy.doq.framing import DoqError
from doqproxy.doq.server_rules import DoqServerStats
from doqproxy.frontend.doq_guard import GuardedQuicServer
from doqproxy.frontend.ticket_store import TicketStore
from doqproxy.net.addresses import HostPort
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)


class ListenError(Exception):
    """The listener cannot start; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class DoqListenerConfig:
    """Limits and timers of the DoQ listener."""

    idle_timeout: float = 30.0
    max_streams: int = 128
    """Streams a client may have open at once on one connection."""
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    """Caps on connections and handshakes, and when to send a Retry."""
    handshake_timeout: float = 5.0
    """Seconds a new connection has to complete its handshake."""
    notify_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    """Clients that may send NOTIFY; others get REFUSED. ``None``: no restriction (for a
    backend that answers NOTIFY itself, with NOTIMP)."""
    ticket_lifetime: float = 86400.0
    """Seconds a session ticket stays valid; 0 turns tickets (and 0-RTT) off."""
    stream_timeout: float = 5.0
    """Seconds a query has to arrive completely on its stream."""
    reuseport: bool = False
    """Bind with SO_REUSEPORT, so that several processes share the port on purpose."""


def tls_configuration(cert: str, key: str, config: DoqListenerConfig) -> QuicConfiguration:
    """The server's QUIC configuration, ALPN ``doq`` only. Raises :class:`ListenError`."""
    quic = QuicConfiguration(
        is_client=False,
        alpn_protocols=[framing.ALPN],
        idle_timeout=config.idle_timeout,
    )
    try:
        quic.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ListenError(f"cannot read {exc.filename!r}: no such file") from None
    except OSError as exc:
        raise ListenError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ListenError(f"certificate {cert!r} or key {key!r} is not usable PEM: {exc}") from None
    return quic


def bind_udp(address: HostPort, *, reuseport: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``address``.

    Without ``reuseport`` a port that another process holds is an error: with
    SO_REUSEPORT a second ``serve`` (even with another zone) would bind silently and
    the kernel would split clients between the two. With it, several processes
    share the port on purpose, as CoreDNS's ``reuseport`` does.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = "not an address of this machine"
        else:
            reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {address} (UDP): {reason}") from None
    sock.setblocking(False)
    return sock


class _Stream:
    """A query being read: its bytes so far, whether any came as 0-RTT, its deadline."""

    __slots__ = ("deadline", "dispatched", "early", "reader")

    def __init__(self, early: bool, deadline: asyncio.TimerHandle) -> None:
        self.reader = framing.StreamReader()
        self.early = early
        self.deadline = deadline
        self.dispatched = False


class DoqConnection(QuicConnectionProtocol):
    """One client's QUIC connection: reads queries from streams, writes answers back."""

    def __init__(self, quic: QuicConnection, listener: DoqListener, client: str) -> None:
        super().__init__(quic)
        self._listener = listener
        self._stats = listener.stats
        self.client = client
        self.counted: str | None = "half-open"
        """How the listener counts this connection: half-open, established, or not at all."""
        self._handshake_timer = self._loop.call_later(
            listener.config.handshake_timeout, self._on_handshake_timeout
        )
        self._may_notify = listener.may_notify(client)
        self._handshake_done = False
        self._sent_code: int | None = None
        self._terminated = False
        self._streams: dict[int, _Stream] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    # --- driven by aioquic --------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # Deliberately no super(): the default keeps a StreamReader per stream forever.
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event)
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_done = True
            self._handshake_timer.cancel()
            if not self._listener.handshake_completed(self):
                self._sent_code = QuicErrorCode.CONNECTION_REFUSED
                self._quic.close(
                    error_code=QuicErrorCode.CONNECTION_REFUSED,
                    reason_phrase="too many connections",
                )
                self._cancel_all()
        elif isinstance(event, events.StreamReset | events.StopSendingReceived):
            self._on_stream_cancelled(event.stream_id)
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event)

    # --- used by the listener -----------------------------------------------

    def shutdown(self) -> None:
        """Close with DOQ_NO_ERROR (server going away)."""
        self._close(DoqError.NO_ERROR, "server shutting down")

    # --- internals ------------------------------------------------------------

    def _on_handshake_timeout(self) -> None:
        if self._handshake_done or self._terminated:
            return
        self._stats.handshake_timeouts += 1
        log.debug("handshake from %s not complete in time, closing", self.client)
        self._listener.connection_ended(self)  # the slot is free now, not after draining
        self._sent_code = QuicErrorCode.CONNECTION_REFUSED
        self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="handshake timeout")
        self._cancel_all()
        self.transmit()

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        sid = event.stream_id
        if self._sent_code is not None:
            return
        if not framing.is_client_bidi(sid):
            self._protocol_error(f"data on stream {sid}, not a client bidirectional stream")
            return
        stream = self._streams.get(sid)
        if stream is None:
            deadline = self._loop.call_later(
                self._listener.config.stream_timeout, self._on_deadline, sid
            )
            stream = self._streams[sid] = _Stream(not self._handshake_done, deadline)
        elif not self._handshake_done:
            stream.early = True
        try:
            message = stream.reader.feed(event.data, event.end_stream)
            if message is None and stream.reader.message_complete:
                # The whole message is in; answer now rather than wait for FIN.
                # (The reader has no end state: asking it with end_stream=True is
                # how it hands the message over, and later data is still checked.)
                message = stream.reader.feed(b"", True)
        except framing.DoqProtocolError as exc:
            self._protocol_error(str(exc))
            return
        if message is not None and not stream.dispatched:
            stream.dispatched = True
            self._dispatch(sid, message, stream.early)
        if event.end_stream and sid in self._streams:
            self._streams.pop(sid).deadline.cancel()

    def _dispatch(self, sid: int, message: bytes, early: bool) -> None:
        try:
            early_reply = server_rules.admit(message, early=early, notify=self._may_notify)
        except framing.DoqProtocolError as exc:
            self._protocol_error(str(exc))
            return
        self._stats.streams += 1
        if early:
            self._stats.early_queries += 1
        if early_reply is not None:
            if server_rules.TOO_EARLY_TEXT.encode() in early_reply:
                self._stats.too_early += 1
            else:
                self._stats.refused_queries += 1
            self._send(sid, early_reply)
            return
        task = asyncio.create_task(self._answer(sid, message))
        self._tasks[sid] = task
        task.add_done_callback(lambda _: self._tasks.pop(sid, None))

    async def _answer(self, sid: int, message: bytes) -> None:
        try:
            reply = await self._listener.resolver.resolve(message, udp=False)
            if reply is not None and server_rules.wants_padding(message):
                reply = rewrite.pad_response(reply)
        except Exception:
            log.exception("resolver failed on stream %d", sid)
            self._reset(sid, DoqError.INTERNAL_ERROR)
            self._transmit_soon()
            return
        if reply is None:
            # Not a DNS query at all (shorter than a header, or QR=1).
            self._reset(sid, DoqError.UNSPECIFIED_ERROR)
        else:
            self._send(sid, reply)
        # Once per loop turn: the answers finished in this turn (the queries of one
        # client datagram, answered from the cache or a zone) share packets.
        self._transmit_soon()

    def _send(self, sid: int, reply: bytes) -> None:
        if self._sent_code is not None or self._terminated:
            return
        try:
            self._quic.send_stream_data(sid, framing.frame(reply), end_stream=True)
        except (RuntimeError, ValueError) as exc:
            # The client stopped or reset the stream meanwhile.
            log.debug("stream %d: answer dropped: %s", sid, exc)

    def _reset(self, sid: int, code: int) -> None:
        if self._sent_code is not None or self._terminated:
            return
        try:
            self._quic.reset_stream(sid, code)
        except (RuntimeError, ValueError) as exc:
            log.debug("stream %d: reset failed: %s", sid, exc)

    def _on_deadline(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        if stream is None or self._sent_code is not None or self._terminated:
            return
        self._stats.stream_timeouts += 1
        log.debug("stream %d: query not complete after deadline, resetting", sid)
        try:
            self._quic.stop_stream(sid, DoqError.REQUEST_CANCELLED)
        except ValueError as exc:
            log.debug("stream %d: stop failed: %s", sid, exc)
        if not stream.dispatched:
            self._reset(sid, DoqError.REQUEST_CANCELLED)
        self.transmit()

    def _on_stream_cancelled(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        pending = stream is not None and not stream.dispatched
        if stream is not None:
            stream.deadline.cancel()
        task = self._tasks.pop(sid, None)
        if task is not None:
            task.cancel()
            pending = True
        if pending:
            # No answer will come: finish our side too, so the stream's credit returns.
            self._stats.streams_cancelled += 1
            self._reset(sid, DoqError.REQUEST_CANCELLED)

    def _protocol_error(self, reason: str) -> None:
        log.info("closing connection: %s", reason)
        self._close(DoqError.PROTOCOL_ERROR, reason)

    def _close(self, code: DoqError, reason: str) -> None:
        if self._sent_code is not None or self._terminated:
            return
        self._sent_code = code
        self._stats.count_close(self._stats.closes_sent, code)
        self._quic.close(error_code=code, reason_phrase=reason)
        self._cancel_all()
        self.transmit()

    def _cancel_all(self) -> None:
        for stream in self._streams.values():
            stream.deadline.cancel()
        self._streams.clear()
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        self._terminated = True
        self._handshake_timer.cancel()
        self._cancel_all()
        self._listener.connection_ended(self)
        if self._sent_code is not None:
            return
        if event.frame_type is None:
            self._stats.count_close(self._stats.closes_received, event.error_code)
            log.debug("client closed with 0x%x %s", event.error_code, event.reason_phrase)
        elif (
            event.error_code == QuicErrorCode.INTERNAL_ERROR
            and event.reason_phrase == "Idle timeout"
        ):
            self._stats.idle_timeouts += 1
            log.debug("connection idle, closed")
        else:
            self._stats.count_close(self._stats.transport_closes, event.error_code)
            log.debug("QUIC closed with 0x%x %s", event.error_code, event.reason_phrase)


class DoqListener:
    """Accepts DoQ connections on one UDP socket and answers through ``resolver``."""

    def __init__(
        self,
        resolver: Resolver,
        quic_configuration: QuicConfiguration,
        config: DoqListenerConfig | None = None,
    ) -> None:
        self.resolver = resolver
        self.config = config or DoqListenerConfig()
        self.stats = DoqServerStats()
        self.tickets = (
            TicketStore(self.config.ticket_lifetime) if self.config.ticket_lifetime > 0 else None
        )
        self._quic_configuration = quic_configuration
        self.admission = Admission(self.config.admission)
        self._connections: set[DoqConnection] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, address: HostPort | socket.socket) -> tuple[str, int]:
        """Start serving on ``address`` (or a socket bound already); return (host, port)."""
        if isinstance(address, socket.socket):
            sock = address
        else:
            sock = bind_udp(address, reuseport=self.config.reuseport)
        loop = asyncio.get_running_loop()
        tickets = self.tickets
        transport, _ = await loop.create_datagram_endpoint(
            lambda: GuardedQuicServer(
                admission=self.admission,
                create_connection=self._new_connection,
                on_refused=self._refused,
                on_retry=self._update_counts,
                configuration=self._quic_configuration,
                session_ticket_fetcher=tickets.pop if tickets is not None else None,
                session_ticket_handler=tickets.add if tickets is not None else None,
            ),
            sock=sock,
        )
        self._transport = transport
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        return self.address

    def may_notify(self, client: str) -> bool:
        """Whether ``client`` may send NOTIFY (``notify_from``)."""
        if self.config.notify_from is None:
            return True
        try:
            address = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self.config.notify_from)

    def _new_connection(self, quic: QuicConnection, client: str) -> DoqConnection:
        # aioquic hard-codes 128 bidirectional streams; set ours before the first
        # datagram, i.e. before the transport parameters are written.
        limit = quic._local_max_streams_bidi
        limit.value = limit.sent = self.config.max_streams
        connection = DoqConnection(quic, self, client)
        self.admission.opened(client)
        self._connections.add(connection)
        self.stats.connections += 1
        self._update_counts()
        return connection

    def _refused(self, client: str, reason: str) -> None:
        self.stats.refused += 1
        refused = self.stats.refused
        if refused & (refused - 1) == 0:  # the 1st, 2nd, 4th, 8th...: no flood of lines
            log.info("refused a connection from %s: %s (%d so far)", client, reason, refused)

    def handshake_completed(self, connection: DoqConnection) -> bool:
        """Count ``connection`` as established; False if that goes over max_connections."""
        if connection.counted != "half-open":
            return False
        self.admission.handshake_done()
        connection.counted = "established"
        self._update_counts()
        if self.admission.established > self.config.admission.max_connections:
            self.stats.refused += 1
            self.connection_ended(connection)
            return False
        return True

    def connection_ended(self, connection: DoqConnection) -> None:
        if connection.counted is not None:
            self.admission.closed(
                connection.client, established=connection.counted == "established"
            )
            connection.counted = None
        self._connections.discard(connection)
        self._update_counts()

    def _update_counts(self) -> None:
        self.stats.active = self.admission.established
        self.stats.handshaking = self.admission.half_open
        self.stats.retries = self.admission.retries

    async def aclose(self) -> None:
        """Close every connection with DOQ_NO_ERROR, then the socket and the resolver."""
        for connection in list(self._connections):
            connection.shutdown()
        # Let the event loop hand the close datagrams to the socket.
        await asyncio.sleep(0)
        if self._transport is not None:
            self._transport.close()
        await self.resolver.upstream.aclose()
