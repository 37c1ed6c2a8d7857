"""``doqproxy forward`` at run time: bind, serve UDP and TCP, shut down cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
import time
from collections.abc import Callable, Hashable
from pathlib import Path

from doqproxy.cache.policy import make_cache
from doqproxy.frontend.access import AccessList, default_access, listener_reaches_lan
from doqproxy.frontend.admission import AccessSettings, Admission
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.tcp import TcpFrontEnd
from doqproxy.frontend.udp import UdpFrontEnd
from doqproxy.frontend.udp_drain import DrainedUdpFront, choose_reader
from doqproxy.net.interfaces import InterfaceAddress, InterfaceError, interface_addresses
from doqproxy.net.sockets import bind
from doqproxy.ops import process
from doqproxy.ops.control import Operations
from doqproxy.ops.reload import Reloader
from doqproxy.ops.systemd import Activated
from doqproxy.resolver import Resolver
from doqproxy.routing.build import RouteBuilder, fallbacks_of
from doqproxy.routing.local_zones import LocalZones
from doqproxy.routing.router import Router, affected, changed_domains
from doqproxy.settings import ForwardSettings
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.bootstrap import Bootstrap
from doqproxy.upstream.doq_connection import client_configuration, warm_up
from doqproxy.upstream.group import Member, UpstreamGroup
from doqproxy.upstream.health import Health
from doqproxy.upstream.health_file import HealthFile
from doqproxy.upstream.pool import DoqUpstream
from doqproxy.upstream.spec import UpstreamSpec
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


class UpstreamBuilder:
    """Builds the upstream group from the settings, at start and on every reload.

    It owns what all members share and what outlives a reload: one ticket file
    (each DoQ member keeps its own entries in it) and the health file.
    """

    def __init__(self, state_dir: Path | None) -> None:
        self.tickets = TicketFile(state_dir)
        self.health_file = HealthFile(state_dir)
        self._bootstrap: tuple[tuple[object, ...], Bootstrap] | None = None

    def bootstrap(self, settings: ForwardSettings) -> Bootstrap:
        """The name lookups (``--bootstrap``, pinned addresses) shared by the members."""
        routing = settings.routing
        key = (routing.bootstrap, routing.addresses)
        if self._bootstrap is None or self._bootstrap[0] != key:
            self._bootstrap = (key, Bootstrap(routing.bootstrap, pinned=dict(routing.addresses)))
        return self._bootstrap[1]

    def member_key(self, spec: UpstreamSpec, settings: ForwardSettings) -> Hashable:
        """Everything a member is built from: equal keys mean the member can be kept."""
        routing = settings.routing
        name = spec.tls_server_name or settings.tls_server_name or spec.url.host
        return (
            str(spec.url),
            spec.tls_server_name or settings.tls_server_name,
            spec.tls_ca_file or settings.tls_ca_file,
            settings.padding,
            settings.pool,
            routing.bootstrap,
            routing.addresses_for(spec.url.host),
            routing.pins_for(name) or routing.pins_for(spec.url.host),
        )

    def member(self, spec: UpstreamSpec, settings: ForwardSettings) -> Upstream:
        """One upstream from its spec (raises OSError/ValueError for bad TLS files)."""
        url = spec.url
        server_name = spec.tls_server_name or settings.tls_server_name or url.host
        ca_file = spec.tls_ca_file or settings.tls_ca_file
        configuration = client_configuration(server_name, ca_file=ca_file)
        pool = dataclasses.replace(settings.pool, handshake_timeout=settings.timeout)
        if not settings.padding:
            pool = dataclasses.replace(pool, pad_block=None)
        routing = settings.routing
        bootstrap = self.bootstrap(settings)
        return DoqUpstream(
            url,
            configuration,
            pool,
            tickets=self.tickets,
            resolve=bootstrap.resolve,
            forget=bootstrap.failed,
            pins=routing.pins_for(server_name) or routing.pins_for(url.host),
        )

    def group(
        self,
        settings: ForwardSettings,
        previous: UpstreamGroup | None = None,
        wrap: Callable[[Upstream], Upstream] | None = None,
    ) -> UpstreamGroup:
        """The group for ``settings``; members of ``previous`` whose key did not change
        are carried over as they are (pool, connections, health and counters)."""
        kept = {m.key: m for m in previous.members} if previous is not None else {}
        members = []
        now = time.monotonic()
        for spec in settings.upstreams:
            key = self.member_key(spec, settings)
            member = kept.get(key)
            if member is None:
                member = Member(key, self.member(spec, settings), Health())
                self.health_file.restore(member.name, member.health, now)
            members.append(member)
        return UpstreamGroup(
            members,
            settings.selection,
            timeout=settings.timeout,
            health_file=self.health_file,
            wrap=wrap,
        )


def make_upstream(settings: ForwardSettings) -> UpstreamGroup:
    """The upstream group for ``settings`` (a fresh builder: tests and tools)."""
    return UpstreamBuilder(settings.state_dir).group(settings)


# --- routes, locally served names and fallback (issue 11 part B) --------------------


class Routes:
    """The routing in force: builds the resolver's upstream around the default one,
    sets the locally served zones, and on reload drops the cache entries of names
    whose route changed and closes the upstreams no route uses any more."""

    def __init__(self, resolver: Resolver, tickets: TicketFile) -> None:
        self.resolver = resolver
        self.tickets = tickets
        """The ticket file the default upstreams write: route upstreams share it."""
        self.builder: RouteBuilder | None = None
        self.specs: dict[str, str] = {}
        self.fallbacks: list[object] = []

    def apply(self, settings: ForwardSettings, default: Upstream) -> Upstream:
        """The upstream the resolver should ask (before the ops wrapper)."""
        pool = (
            settings.pool
            if settings.padding
            else dataclasses.replace(settings.pool, pad_block=None)
        )
        builder = RouteBuilder(
            settings.routing,
            ca_file=settings.tls_ca_file,
            pool=pool,
            timeout=settings.timeout,
            selection=settings.selection,
        )
        builder.tickets = self.tickets  # one ticket file, one writer
        old = self.builder
        if old is not None and _reusable(old) == _reusable(builder):
            builder.made = dict(old.made)
            builder.bootstrap = old.bootstrap
        pinned = dict(builder.bootstrap.pinned)
        try:
            routed, local = builder.build(default)
        except Exception:
            # A later route failed (a bad CA file, say): the upstreams this build
            # already made and started would run on unused. The old ones stay, and
            # so do the addresses they look up (a new stamp may have pinned one in
            # the bootstrap they share).
            builder.bootstrap.pinned.clear()
            builder.bootstrap.pinned.update(pinned)
            kept = {id(u) for u in old.made.values()} if old is not None else set()
            for upstream in builder.made.values():
                if id(upstream) not in kept:
                    _close_later(upstream, 0.0)
            raise
        # Keep only what the new routes use: the rest is closed below.
        used = {
            *settings.routing.fallback,
            *(t for r in settings.routing.routes for t in r.upstreams),
        }
        builder.made = {text: u for text, u in builder.made.items() if text in used}
        # The default route is "the -u upstreams": changing them keeps the cache,
        # as before routes existed; only a change of routes drops entries.
        specs = {".": "-u", **(routed.specs if isinstance(routed, Router) else {})}
        self.resolver.local = local if local else None
        cache = self.resolver.cache
        if (
            old is not None
            and cache is not None
            and old.routing.local_zones != (settings.routing.local_zones)
        ):
            served = LocalZones()  # what is (or was) answered here must not come from the cache
            dropped = cache.drop_names(lambda name: served.zone_of(name) is not None)
            log.warning("reload: local zones turned %s; %d cached entries dropped",
                        "on" if settings.routing.local_zones else "off", dropped)  # fmt: skip
        if old is not None and cache is not None:
            changed = changed_domains(self.specs, specs)
            if changed:
                dropped = cache.drop_names(affected(changed, {**self.specs, **specs}))
                log.warning("reload: routes changed for %s; %d cached entries dropped",
                            ", ".join(changed), dropped)  # fmt: skip
        if old is not None and old is not builder:
            for upstream in old.unused(builder):
                _close_later(upstream, settings.timeout)
        self.builder, self.specs = builder, specs
        self.fallbacks = list(fallbacks_of(routed))
        return routed

    async def aclose(self) -> None:
        if self.builder is not None:
            await self.builder.aclose()


def _reusable(builder: RouteBuilder) -> tuple[object, ...]:
    """What an upstream made by ``builder`` depends on, besides its URL."""
    routing = builder.routing
    return (routing.bootstrap, routing.addresses, routing.pins, builder.ca_file, builder.pool,
            builder.timeout, builder.selection)  # fmt: skip


_closing: set[asyncio.Task[None]] = set()


def _close_later(upstream: Upstream, grace: float) -> None:
    async def close() -> None:
        await asyncio.sleep(grace)
        await upstream.aclose()

    task = asyncio.get_running_loop().create_task(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


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
    builder = UpstreamBuilder(settings.state_dir)
    upstream = builder.group(settings, wrap=ops.wrap_upstream)
    for member in upstream.members:
        if isinstance(member.upstream, DoqUpstream):
            warm_up(member.upstream.configuration)
            break
    upstream.start()
    resolver = Resolver(
        upstream,
        timeout=settings.timeout,
        cache=make_cache(settings.cache, max_udp=settings.max_udp_size),
        max_udp=settings.max_udp_size,
    )
    routes = Routes(resolver, builder.tickets)
    # The group's members are timed one by one (ops.wrap_upstream), so the routed
    # upstream is not wrapped again.
    resolver.upstream = routes.apply(settings, upstream)
    ops.fallbacks = lambda: routes.fallbacks
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
    drained: list[DrainedUdpFront] = []
    servers: list[asyncio.base_events.Server] = []
    reader = choose_reader(settings.udp_reader, process.event_loop_name())
    log.info("UDP reader: %s (--udp-reader %s)", reader, settings.udp_reader)
    for udp_sock in udp_socks:
        if reader == "drain":
            dfront = DrainedUdpFront(front_resolver, inflight, admission, udp_sock)
            try:
                dfront.start(loop)
            except NotImplementedError:  # a loop without add_reader (Windows' proactor)
                log.info("this event loop cannot watch sockets: UDP uses --udp-reader protocol")
            else:
                drained.append(dfront)
                continue
        front = UdpFrontEnd(front_resolver, inflight, admission)
        await loop.create_datagram_endpoint(lambda front=front: front, sock=udp_sock)  # type: ignore[misc]
        udp_fronts.append(front)
    for tcp_sock in tcp_socks:
        servers.append(await asyncio.start_server(tcp_front.handle, sock=tcp_sock))
    log.info(
        "listening on %s, forwarding to %s",
        ", ".join(_sockname(s) for s in (*udp_socks, *tcp_socks)),
        ", ".join(m.name for m in upstream.members),
    )
    reloader = None
    if reload is not None:
        reloader = Reloader(
            settings,
            reload,
            lambda new, old: builder.group(new, old, wrap=ops.wrap_upstream),
            ops,
            resolver,
            route=routes.apply,
        )

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
    for dfront in drained:
        dfront.accepting = False
    cancelled = await inflight.drain(SHUTDOWN_GRACE)
    if cancelled:
        log.warning("shutdown: %d queries did not finish in %.0fs", cancelled, SHUTDOWN_GRACE)
    tcp_front.close_all()
    for front in udp_fronts:
        if front.transport is not None:
            front.transport.close()
    for dfront in drained:
        dfront.close()
    if reloader is not None:
        await reloader.aclose()
    await ops.close()
    await resolver.aclose()
    await (ops.upstream or upstream).aclose()
    await routes.aclose()
    for task in list(_closing):
        task.cancel()
    builder.tickets.save()
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
