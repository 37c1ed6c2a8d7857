"""The QUIC engine boundary: what the DoQ client needs from a QUIC implementation.

:class:`~doqproxy.upstream.doq_connection.DoqConnection` holds the DoQ logic (one
query per stream, stream credit, liveness) and drives a :class:`ClientSession`;
everything specific to a QUIC library, its internals and its workarounds, lives
on the other side, in ``engine_<name>.py``. The pool and the probe never import a
QUIC library.

:data:`NAME` is the engine in use (for logs and the build-info metric).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any, Protocol

ENGINES = ("aioquic", "qh3")
"""Engines this build knows."""

ENV = "DOQPROXY_QUIC_ENGINE"
"""The environment variable that names the engine (``--quic-engine``'s)."""


def default_name() -> str:
    """The engine used unless one is selected: ``$DOQPROXY_QUIC_ENGINE`` when it
    names an installed engine (so code that builds pools and connections in
    process follows it too, the tests included), else qh3 when it is installed (a
    default dependency wherever it has wheels: about 40% less CPU per miss), else
    aioquic.

    A bad value is left to the command line to report (``--quic-engine`` reads the
    same variable), so it is ignored here.
    """
    chosen = os.environ.get(ENV, "")
    if chosen in ENGINES and importlib.util.find_spec(chosen) is not None:
        return chosen
    return "qh3" if importlib.util.find_spec("qh3") is not None else "aioquic"


NAME = default_name()
"""The QUIC engine the DoQ client uses."""


class ConnectedTransport:
    """A connected UDP transport that sends without an address, and counts (both engines).

    aioquic (and qh3) pass its peer address to every ``sendto``. On a connected socket
    uvloop accepts only ``None`` or the exact 4-tuple it connected to (an IPv6
    peer is ``(host, port, flowinfo, scope_id)``), and asyncio only the address
    it resolved, so the address is dropped here: the kernel knows the peer.
    """

    __slots__ = ("_transport", "sent")

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport
        self.sent = 0

    def sendto(self, data: bytes, addr: object = None) -> None:
        self.sent += 1
        self._transport.sendto(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


ENGINE_FAILURE = "QUIC engine error"
"""How an engine's close reason starts when its own core failed (not the network, not
the server), for logs; the owner learns it from ``on_terminated(engine_failure=True)``,
never from the text (a server picks its close reason freely)."""


class SessionClosed(Exception):
    """The engine found the connection closed (by the peer) before it said so."""


class SessionOwner(Protocol):
    """What a session reports to (a :class:`DoqConnection`)."""

    def on_datagram(self) -> None:
        """A datagram arrived from the server (after its events were delivered)."""

    def on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...

    def on_stream_reset(self, stream_id: int, error_code: int) -> None: ...

    def on_handshake(self, alpn: str | None, resumed: bool, early_data_accepted: bool) -> None: ...

    def on_terminated(
        self, error_code: int, reason: str, *, draining: bool, engine_failure: bool = False
    ) -> None:
        """The connection ended; ``draining`` when the peer closed it and the
        engine has not reported it yet (it would after the draining period);
        ``engine_failure`` when the engine's own core failed (the queries on it may
        be retried on a new connection)."""

    def on_unreachable(self, reason: str) -> None:
        """The network said the server cannot be reached (ICMP)."""


class ClientSession(Protocol):
    """One client QUIC connection of some engine, on its own connected UDP socket."""

    async def open(self, address: tuple[str, int]) -> None:
        """Create the socket and prepare the first flight, without sending it."""

    def transmit_soon(self) -> None:
        """Send what is pending at the end of this event-loop turn."""

    def send_query(self, data: bytes) -> int:
        """Open the next bidirectional stream, write ``data`` and FIN; its ID.
        Raises :class:`SessionClosed` when the connection turns out to be closed."""

    def cancel_stream(self, stream_id: int, error_code: int) -> None:
        """RESET_STREAM and STOP_SENDING, only for a stream the peer allowed."""

    def ping(self) -> None: ...

    def close(self, error_code: int, reason: str) -> None: ...

    async def wait_closed(self, grace: float) -> None:
        """Wait (at most ``grace`` s) for the close to go out, then release the socket."""

    def abandon(self) -> None:
        """Release the socket of a connection that never sent anything."""

    @property
    def stream_limit(self) -> int:
        """The peer's MAX_STREAMS for bidirectional streams (0 while unknown)."""

    @property
    def streams_opened(self) -> int:
        """Bidirectional streams opened so far."""

    @property
    def probe_timeout(self) -> float:
        """The current PTO in seconds."""

    @property
    def smoothed_rtt(self) -> float | None:
        """The smoothed RTT in seconds, or ``None`` before the first sample."""

    @property
    def idle_timeout(self) -> float:
        """The negotiated idle timeout in seconds."""

    def restart_idle_timer(self) -> None:
        """Count the idle timeout from now."""

    @property
    def datagrams(self) -> tuple[int, int]:
        """Datagrams sent and received so far."""

    @property
    def cipher(self) -> str | None:
        """The TLS cipher suite's IANA name, once negotiated."""

    @property
    def peer_certificate(self) -> Any:
        """The server's leaf certificate (a ``cryptography`` x509 certificate or
        DER bytes), or ``None`` (a resumed session shows none)."""


class Engine(Protocol):
    """What an ``engine_<name>`` module provides."""

    NAME: str
    SessionTicket: type
    CipherSuite: type
    NAIVE_TICKET_DATES: bool

    def version(self) -> str: ...

    def client_configuration(
        self, server_name: str, *, ca_file: str | None, idle_timeout: float = 30.0, **extra: Any
    ) -> Any: ...

    def new_session(
        self,
        owner: SessionOwner,
        configuration: Any,
        *,
        ticket_handler: Callable[[Any], None] | None,
        token_handler: Callable[[bytes], None] | None,
    ) -> ClientSession: ...

    def warm_up(self, configuration: Any) -> None: ...


def installed() -> list[str]:
    """The engines whose library is installed here."""
    return [name for name in ENGINES if importlib.util.find_spec(name) is not None]


def get(name: str | None = None) -> Engine:
    """The engine module for ``name`` (default: the selected one).

    Raises ValueError for an unknown or missing engine. The selected engine is
    imported by :func:`select` at start-up, not here on first use: after ``--user``
    the interpreter's directory may be unreadable. The other engine is never
    imported (qh3's forwarder does not carry aioquic in memory).
    """
    name = NAME if name is None else name
    if name not in ENGINES:
        raise ValueError(f"unknown QUIC engine {name!r} (known: {', '.join(ENGINES)})")
    try:
        module: Any = importlib.import_module(f"doqproxy.upstream.engine_{name}")
    except ImportError as exc:
        raise ValueError(f"QUIC engine {name} is not installed ({exc})") from None
    return module  # type: ignore[no-any-return]


def select(name: str) -> None:
    """Make ``name`` the engine of every connection made from now on (imports it now)."""
    global NAME
    get(name)
    NAME = name


def describe() -> str:
    """``NAME VERSION``, for the start-up log line."""
    return f"{NAME} {get().version()}"
