"""Turning :class:`~doqproxy.routing.routes.RoutingSettings` into running upstreams.

:class:`RouteBuilder` makes one upstream per URL or stamp (``quic://`` a DoQ
pool, ``tls://`` DoT, ``udp://`` plain DNS), shares them between routes, and
reuses the ones a previous build made for the same text (SIGHUP keeps their
connections). :meth:`RouteBuilder.build` wraps the default route's upstream,
which the caller made (``-u``), into a :class:`~doqproxy.routing.router.Router`
with the other routes, and the DoQ routes into
:class:`~doqproxy.upstream.fallback.FallbackUpstream` when ``--fallback`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from doqproxy.routing.local_zones import LocalZones
from doqproxy.routing.router import Router
from doqproxy.routing.routes import RoutingSettings
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.bootstrap import Bootstrap
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.dot import DotUpstream, tls_context
from doqproxy.upstream.fallback import FallbackUpstream
from doqproxy.upstream.group import Member, UpstreamGroup
from doqproxy.upstream.health import Health
from doqproxy.upstream.plain import PlainUpstream
from doqproxy.upstream.pool import DoqUpstream, PoolSettings
from doqproxy.upstream.selection import SelectionSettings
from doqproxy.upstream.targets import Target, parse_target
from doqproxy.upstream.tickets import TicketFile

log = logging.getLogger(__name__)

SCHEMES = ("quic", "tls", "udp")


@dataclass
class RouteBuilder:
    """Builds and keeps the per-URL upstreams of the routes and the fallback."""

    routing: RoutingSettings
    ca_file: str | None = None
    pool: PoolSettings = field(default_factory=PoolSettings)
    timeout: float = 5.0
    made: dict[str, Upstream] = field(default_factory=dict)
    """URL or stamp text → its upstream, reused by the next build."""
    selection: SelectionSettings | None = None
    """How a route with several upstreams picks among them (as for ``-u``)."""
    tickets: TicketFile | None = None
    """Shared with the default upstream (one file, one writer); ``None``: in memory."""

    def __post_init__(self) -> None:
        self.bootstrap = Bootstrap(self.routing.bootstrap, pinned=dict(self.routing.addresses))

    def upstream(self, text: str) -> Upstream:
        """The upstream for one URL or stamp, made once; a stamp pins its address in
        the bootstrap (again on every build that uses it: see :meth:`build`)."""
        target = parse_target(text, SCHEMES)
        host = target.url.host
        if target.addresses and not self.routing.addresses_for(host):
            self.bootstrap.pinned[host.lower().rstrip(".")] = target.addresses
        if text in self.made:
            return self.made[text]
        upstream = self._make(target)
        self.made[text] = upstream
        return upstream

    def _make(self, target: Target) -> Upstream:
        url = target.url
        pins = self.routing.pins_for(url.host)
        if url.scheme == "udp":
            return PlainUpstream(url, tcp_timeout=self.timeout)
        if url.scheme == "tls":
            return DotUpstream(
                url,
                tls_context(self.ca_file),
                resolve=self.bootstrap.resolve,
                forget=self.bootstrap.failed,
                pad_block=self.pool.pad_block,
                connect_timeout=self.timeout,
                pins=pins,
            )
        configuration = client_configuration(url.host, ca_file=self.ca_file)
        pool = dataclasses.replace(self.pool, handshake_timeout=self.timeout)
        doq = DoqUpstream(
            url,
            configuration,
            pool,
            tickets=self.tickets,
            resolve=self.bootstrap.resolve,
            forget=self.bootstrap.failed,
            pins=pins,
        )
        doq.start()
        return doq

    def build(self, default: Upstream) -> tuple[Upstream, LocalZones]:
        """The upstream the resolver asks, and the locally served zones."""
        routing = self.routing
        # The bootstrap may be a previous build's (shared by the upstreams kept): only
        # the configured addresses and the stamps this build uses are pinned.
        pinned = self.bootstrap.pinned
        pinned.clear()
        pinned.update((h.lower().rstrip("."), a) for h, a in dict(routing.addresses).items())
        fallbacks = [self.upstream(text) for text in routing.fallback]
        routes: dict[str, Upstream] = {}
        specs: dict[str, str] = {}
        for spec in routing.routes:
            members = [self.upstream(text) for text in spec.upstreams]
            upstream: Upstream = members[0]
            if len(members) > 1:  # several: selected, hedged and health-checked like -u
                group = [
                    Member(t, m, Health()) for t, m in zip(spec.upstreams, members, strict=True)
                ]
                upstream = UpstreamGroup(group, self.selection, timeout=self.timeout)
            if fallbacks and all(isinstance(m, DoqUpstream) for m in members):
                upstream = FallbackUpstream(
                    upstream, fallbacks, route=spec.domains[0], primary_budget=self.timeout / 2
                )
            for domain in spec.domains:
                routes[domain] = upstream
                specs[domain] = ",".join(spec.upstreams)
        if "." not in routes and fallbacks:
            default = FallbackUpstream(
                default, fallbacks, route=".", primary_budget=self.timeout / 2
            )
        local = LocalZones([d for d in routes if d != "."], enabled=routing.local_zones)
        if not routes:
            return default, local
        router = Router(routes, default)
        router.specs = specs
        return router, local

    async def aclose(self) -> None:
        """Close every upstream made here."""
        for upstream in self.made.values():
            await upstream.aclose()
        self.made.clear()

    def unused(self, keep: RouteBuilder) -> list[Upstream]:
        """Upstreams made here that ``keep`` no longer uses (to close after a reload)."""
        kept = {id(u) for u in keep.made.values()}
        return [u for u in self.made.values() if id(u) not in kept]


def fallbacks_of(upstream: Upstream) -> list[FallbackUpstream]:
    """Every :class:`FallbackUpstream` reachable from the resolver's upstream (metrics)."""
    found: list[FallbackUpstream] = []
    candidates: list[object] = [upstream, getattr(upstream, "inner", None)]
    for candidate in candidates:
        if isinstance(candidate, FallbackUpstream):
            found.append(candidate)
        elif isinstance(candidate, Router):
            found += [u for u in candidate.upstreams() if isinstance(u, FallbackUpstream)]
    return list({id(f): f for f in found}.values())


def reachable(upstream: Upstream) -> tuple[list[Member], list[Upstream]]:
    """Every group member and every single upstream the resolver's upstream can ask,
    routes and fallbacks included, each once (metrics add up those of one name)."""
    members: dict[int, Member] = {}
    leaves: dict[int, Upstream] = {}
    pending: list[Upstream] = [upstream]
    seen: set[int] = set()
    while pending:
        node = pending.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Router):
            pending += node.upstreams()
        elif isinstance(node, FallbackUpstream):
            pending += [node.primary, *node.fallbacks]
        elif isinstance(node, UpstreamGroup):
            for member in node.members:
                members.setdefault(id(member), member)
                pending.append(member.upstream)
        else:
            leaves[id(node)] = node
    return list(members.values()), list(leaves.values())
