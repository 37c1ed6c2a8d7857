"""``doqproxy forward`` at run time: bind, serve UDP and TCP, shut down cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
from collections.abc import Callable

from doqproxy.cache.policy import make_cache
from doqproxy.frontend.access import AccessList, default_access, listener_reaches_lan
from doqproxy.frontend.admission import AccessSettings, Admission
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.tcp import TcpFrontEnd
from doqproxy.frontend.udp import UdpFrontEnd
from doqproxy.net.interfaces import InterfaceAddress, InterfaceError, interface_addresses
from doqproxy.net.sockets import bind
from doqproxy.ops import process
from doqproxy.ops.control import Operations
from doqproxy.ops.reload import Reloader
from doqproxy.ops.systemd import Activated
from doqproxy.resolver import Resolver
from doqproxy.settings import ForwardSettings
from doqproxy.upstream.doq_connection import client_configuration, warm_up
from doqproxy.upstream.pool import DoqUpstream
from doqproxy.upstream.tickets import TicketFile

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 2.0
"""Seconds in-flight queries get to finish after SIGINT/SIGTERM."""


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
    pool = dataclasses.replace(settings.pool, handshake_timeout=settings.timeout)
    if not settings.padding:
        pool = dataclasses.replace(pool, pad_block=None)
    return DoqUpstream(url, configuration, pool, tickets=TicketFile(settings.state_dir))


async def serve(
    settings: ForwardSettings,
    sockets: list[tuple[socket.socket, socket.socket]] | Activated,
    reload: Callable[[], ForwardSettings] | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM, then drain and close. Returns the exit status.

    ``sockets`` are bound pairs from :func:`bind_all` or systemd's; ``reload``
    re-reads the configuration on SIGHUP.
    """
    loop = asyncio.get_running_loop()
    stop = process.stop_event()
    ops = Operations(settings.ops)
    upstream = make_upstream(settings)
    warm_up(upstream.configuration)
    upstream.start()
    resolver = Resolver(
        ops.wrap_upstream(upstream), timeout=settings.timeout, cache=make_cache(settings.cache)
    )
    front_resolver = ops.front_resolver(resolver)
    inflight = InFlight()
    if isinstance(sockets, Activated):
        udp_socks, tcp_socks = list(sockets.udp), list(sockets.tcp)
    else:
        udp_socks, tcp_socks = [u for u, _ in sockets], [t for _, t in sockets]
    hosts = [str(s.getsockname()[0]) for s in (*udp_socks, *tcp_socks)]
    access, reaches_lan = access_for(settings.access, hosts)
    admission = Admission(settings.access, access, reaches_lan=reaches_lan)
    log_access(admission, settings.access, reaches_lan)
    ops.admission = admission
    tcp_front = TcpFrontEnd(front_resolver, inflight, settings.tcp, admission)
    ops.tcp_stats = tcp_front.stats
    udp_fronts: list[UdpFrontEnd] = []
    servers: list[asyncio.base_events.Server] = []
    for udp_sock in udp_socks:
        front = UdpFrontEnd(front_resolver, inflight, admission)
        await loop.create_datagram_endpoint(lambda front=front: front, sock=udp_sock)  # type: ignore[misc]
        udp_fronts.append(front)
    for tcp_sock in tcp_socks:
        servers.append(await asyncio.start_server(tcp_front.handle, sock=tcp_sock))
    log.info(
        "listening on %s, forwarding to %s",
        ", ".join(_sockname(s) for s in (*udp_socks, *tcp_socks)),
        upstream.name,
    )
    reloader = None
    if reload is not None:
        reloader = Reloader(settings, reload, make_upstream, ops, resolver)

        def on_reload(reloader: Reloader = reloader) -> None:
            reloader()
            # Addresses come and go (DHCP, a new VLAN): re-read them even when the
            # configuration itself did not change.
            new = reloader.settings.access
            access, reaches_lan = access_for(new, hosts)
            admission.reconfigure(new, access, reaches_lan=reaches_lan)
            log_access(admission, new, reaches_lan)

        ops.on_reload = on_reload
    # Everything allocated so far lives as long as the process: keep it out of the
    # collector's way, so that full collections stay short (tail latency).
    gc.collect()
    gc.freeze()
    status = 0
    try:
        ops.start(resolver, upstream, inflight)
    except OSError as exc:
        log.error("cannot listen for metrics on %s: %s", settings.ops.metrics_listen, exc.strerror)
        status = 1
        stop.set()
    await stop.wait()
    log.info("shutting down")
    ops.stopping()
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
    if reloader is not None:
        await reloader.aclose()
    await ops.close()
    await resolver.aclose()
    await (ops.upstream or upstream).aclose()
    return status


def access_for(settings: AccessSettings, hosts: list[str]) -> tuple[AccessList, bool]:
    """The access list for the listen addresses ``hosts`` and whether they reach a LAN."""
    addresses: list[InterfaceAddress] = []
    if not settings.allow:
        try:
            addresses = interface_addresses()
        except InterfaceError as exc:
            log.warning("cannot read interface addresses (%s): answering loopback only", exc)
    return default_access(settings.allow, hosts, addresses), listener_reaches_lan(hosts)


def log_access(admission: Admission, settings: AccessSettings, reaches_lan: bool) -> None:
    """Say who is answered, and how fast: a WARNING when other hosts can reach us."""
    if admission.access.open:
        log.warning(
            "--allow any: answering every client that can reach the listener (an open "
            "resolver); make sure a firewall keeps the internet out"
        )
    rate = (
        f"{admission.rate:g} queries/s per /{settings.ratelimit_prefix_v4} and "
        f"/{settings.ratelimit_prefix_v6}"
        if admission.rate
        else "off"
    )
    log.log(
        logging.WARNING if reaches_lan else logging.INFO,
        "clients allowed from %s; UDP rate limit %s",
        admission.access.describe(),
        rate,
    )


def _sockname(sock: socket.socket) -> str:
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    host, port = sock.getsockname()[:2]
    return f"{kind} [{host}]:{port}" if ":" in host else f"{kind} {host}:{port}"
