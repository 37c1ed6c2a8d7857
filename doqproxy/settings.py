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
from doqproxy.net.addresses import HostPort, UpstreamUrl
from doqproxy.ops.control import OpsSettings
from doqproxy.upstream.pool import PoolSettings


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
    state_dir: Path | None = None
    """Where session tickets persist; ``None`` keeps them in memory only."""
    ops: OpsSettings = field(default_factory=OpsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
