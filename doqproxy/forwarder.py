"""``doqproxy forward`` at run time: bind, serve UDP and TCP, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

from . import runtime
from .addresses import HostPort, UpstreamUrl
from .doq_client import client_configuration
from .inflight import InFlight
from .listen_tcp import TcpFrontEnd, TcpLimits
from .listen_udp import UdpFrontEnd
from .pool import DoqUpstream, PoolSettings
from .resolver import Resolver
from .sockets import bind

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 2.0
"""Seconds in-flight queries get to finish after SIGINT/SIGTERM."""


@dataclass(slots=True, frozen=True)
class ForwardSettings:
    listen: tuple[HostPort, ...]
    upstream: UpstreamUrl
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    timeout: float = 5.0
    padding: bool = True
    tcp: TcpLimits = field(default_factory=TcpLimits)
    pool: PoolSettings = field(default_factory=PoolSettings)


def bind_all(settings: ForwardSettings) -> list[tuple[socket.socket, socket.socket]]:
    """Bind UDP and TCP on every listen address (raises ListenError)."""
    bound: list[tuple[socket.socket, socket.socket]] = []
    try:
        for address in settings.listen:
            udp = bind(address, socket.SOCK_DGRAM)
            try:
                tcp = bind(address, socket.SOCK_STREAM)
            except OSError:
                udp.close()
                raise
            bound.append((udp, tcp))
    except OSError:
        for udp, tcp in bound:
            udp.close()
            tcp.close()
        raise
    return bound


def make_upstream(settings: ForwardSettings) -> DoqUpstream:
    url = settings.upstream
    server_name = settings.tls_server_name or url.host
    configuration = client_configuration(server_name, ca_file=settings.tls_ca_file)
    pool = settings.pool
    if not settings.padding:
        pool = PoolSettings(
            max_connections=pool.max_connections,
            max_streams=pool.max_streams,
            idle_timeout=pool.idle_timeout,
            pad_block=None,
        )
    return DoqUpstream(url, configuration, pool)


async def serve(
    settings: ForwardSettings, sockets: list[tuple[socket.socket, socket.socket]]
) -> int:
    """Serve until SIGINT/SIGTERM, then drain and close. Returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = runtime.stop_event()
    upstream = make_upstream(settings)
    resolver = Resolver(upstream, timeout=settings.timeout)
    inflight = InFlight()
    tcp_front = TcpFrontEnd(resolver, inflight, settings.tcp)
    udp_fronts: list[UdpFrontEnd] = []
    servers: list[asyncio.base_events.Server] = []
    for udp_sock, tcp_sock in sockets:
        front = UdpFrontEnd(resolver, inflight)
        await loop.create_datagram_endpoint(lambda front=front: front, sock=udp_sock)  # type: ignore[misc]
        udp_fronts.append(front)
        servers.append(await asyncio.start_server(tcp_front.handle, sock=tcp_sock))
    log.info(
        "listening on %s, forwarding to %s",
        ", ".join(str(a) for a in settings.listen),
        upstream.name,
    )
    await stop.wait()
    log.info("shutting down")
    for server in servers:
        server.close()
    for front in udp_fronts:
        front.accepting = False
    cancelled = await inflight.drain(SHUTDOWN_GRACE)
    if cancelled:
        log.warning("shutdown: %d queries did not finish in %.0fs", cancelled, SHUTDOWN_GRACE)
    tcp_front.close_all()
    for front in udp_fronts:
        if front.transport is not None:
            front.transport.close()
    await upstream.aclose()
    return 0
