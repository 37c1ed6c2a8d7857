"""Everything ``doqproxy forward`` is configured with, as one frozen value.

The CLI builds it (flags, environment, TOML); the forwarder runs it; the reloader
compares the old and the new one on SIGHUP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from doqproxy.cache.policy import CacheSettings
from doqproxy.frontend.admission import AccessSettings
from doqproxy.frontend.tcp import TcpLimits
from doqproxy.net.addresses import HostPort
from doqproxy.ops.control import OpsSettings
from doqproxy.routing.routes import RoutingSettings
from doqproxy.upstream.pool import PoolSettings
from doqproxy.upstream.selection import SelectionSettings
from doqproxy.upstream.spec import UpstreamSpec


@dataclass(slots=True, frozen=True)
class ForwardSettings:
    listen: tuple[HostPort, ...]
    upstreams: tuple[UpstreamSpec, ...]
    """In the order given (``failover`` follows it); never empty, no duplicates."""
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    timeout: float = 5.0
    padding: bool = True
    max_udp_size: int = 1232
    """The largest UDP reply, and the payload size our OPT advertises."""
    udp_reader: str = "auto"
    """``drain``: a reader callback empties the UDP socket; ``protocol``: one protocol
    callback per datagram; ``auto``: drain on asyncio, protocol on uvloop (BENCHMARKS.md)."""
    tcp: TcpLimits = field(default_factory=TcpLimits)
    pool: PoolSettings = field(default_factory=PoolSettings)
    state_dir: Path | None = None
    """Where session tickets persist; ``None`` keeps them in memory only."""
    ops: OpsSettings = field(default_factory=OpsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    """How queries are spread over the upstreams (strategy, hedging)."""
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    """Routes, local zones, bootstrap, pinned addresses and SPKI pins, fallback."""
    access: AccessSettings = field(default_factory=AccessSettings)
