"""``doqproxy serve``: answer DNS-over-QUIC from a plain DNS server or from a zone file."""

from __future__ import annotations

import importlib
import ipaddress
import logging
import socket

import click

from doqproxy.cli.types import FiniteFloatRange
from doqproxy.dns import wire
from doqproxy.doq.admission import AdmissionLimits
from doqproxy.doq.framing import DEFAULT_PORT
from doqproxy.frontend.doq import (
    DoqListener,
    DoqListenerConfig,
    ListenError,
    bind_udp,
    tls_configuration,
)
from doqproxy.net.addresses import AddressError, HostPort, parse_listen, parse_upstream
from doqproxy.ops.metrics import MetricsServer, ServeCollector
from doqproxy.ops.privileges import PrivilegeError, drop_privileges, warn_if_root
from doqproxy.ops.process import run, setup_logging, stop_event
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.plain import MAX_IN_FLIGHT, PlainUpstream
from doqproxy.upstream.zone import ZoneBackend, ZoneError

log = logging.getLogger("doqproxy.serve")
_LIMITS = AdmissionLimits()

FORWARD_OPCODES = frozenset({wire.OPCODE_QUERY, wire.OPCODE_NOTIFY})
"""A plain DNS server behind DoQ may be a secondary that wants NOTIFY; it is passed on
from the clients ``--allow-notify`` names, and refused from everyone else."""
BACKEND_NAME = "backend"
"""How SERVFAIL's EDE text names the plain DNS server: clients don't learn its address."""
ZONE_OPCODES = frozenset({wire.OPCODE_QUERY})
"""The zone backend only answers queries; NOTIFY and the rest get NOTIMP."""


def _backend(
    upstream: str | None, zone: str | None, origin: str | None, max_in_flight: int
) -> tuple[Upstream, frozenset[int]]:
    if (upstream is None) == (zone is None):
        raise click.ClickException(
            "give exactly one of --upstream udp://HOST[:PORT] or --zone FILE"
        )
    if upstream is not None:
        if origin is not None:
            raise click.ClickException("--origin goes with --zone, not --upstream")
        plain = PlainUpstream(
            parse_upstream(upstream, schemes=("udp",)),
            max_in_flight=max_in_flight,
            display_name=BACKEND_NAME,
        )
        return plain, FORWARD_OPCODES
    assert zone is not None
    return ZoneBackend.from_file(zone, origin), ZONE_OPCODES


ENV_PREFIX = "DOQPROXY_SERVE"
"""Every option is also an environment variable: ``--max-handshakes`` is
``DOQPROXY_SERVE_MAX_HANDSHAKES`` (a prefix of its own, so that forward's
``DOQPROXY_*`` settings never leak into serve)."""


@click.command(context_settings={"auto_envvar_prefix": ENV_PREFIX})
@click.option(
    "-l",
    "--listen",
    default=f"127.0.0.1:{DEFAULT_PORT}",
    show_default=True,
    metavar="ADDR[:PORT]",
    help=f"UDP address to accept DoQ on; the port defaults to {DEFAULT_PORT}.",
)
@click.option("--cert", required=True, metavar="PEM", help="Certificate chain, PEM.")
@click.option("--key", required=True, metavar="PEM", help="Private key, PEM.")
@click.option(
    "-u", "--upstream", metavar="udp://HOST[:PORT]", help="Plain DNS server to forward to."
)
@click.option("--zone", metavar="FILE", help="Zone file to answer from, authoritatively.")
@click.option("--origin", metavar="NAME", help="Zone origin, if the file has no $ORIGIN.")
@click.option(
    "--idle-timeout",
    type=FiniteFloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds before an idle connection is closed.",
)
@click.option(
    "--max-streams",
    type=click.IntRange(1, 65535),
    default=128,
    show_default=True,
    help="Queries in flight per connection; more wait for stream credit.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=_LIMITS.max_connections,
    show_default=True,
    help="Established connections; more are refused before any TLS work.",
)
@click.option(
    "--max-handshakes",
    type=click.IntRange(min=1),
    default=_LIMITS.max_handshakes,
    show_default=True,
    help="Handshakes under way at once; they do not count against --max-connections.",
)
@click.option(
    "--handshake-timeout",
    type=FiniteFloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds a new connection has to complete its handshake.",
)
@click.option(
    "--max-connections-per-ip",
    type=click.IntRange(min=1),
    default=_LIMITS.max_per_address,
    show_default=True,
    help="Connections (and handshakes) from one client address.",
)
@click.option(
    "--max-connections-per-prefix",
    type=click.IntRange(min=1),
    default=_LIMITS.max_per_prefix,
    show_default=True,
    help="Connections from one client network (see --connection-prefix-v4/-v6).",
)
@click.option(
    "--connection-prefix-v4",
    type=click.IntRange(8, 32),
    default=_LIMITS.prefix_v4,
    show_default=True,
    help="IPv4 prefix length of a client network.",
)
@click.option(
    "--connection-prefix-v6",
    type=click.IntRange(16, 128),
    default=_LIMITS.prefix_v6,
    show_default=True,
    help="IPv6 prefix length of a client network.",
)
@click.option("--retry", is_flag=True, help="Always validate client addresses with a Retry.")
@click.option(
    "--retry-threshold",
    type=click.IntRange(min=0),
    default=_LIMITS.retry_threshold,
    show_default=True,
    help="Half-open handshakes beyond which new clients must answer a Retry; 0: never.",
)
@click.option(
    "--reuseport",
    is_flag=True,
    help="Share the port with other serve processes (SO_REUSEPORT); else a taken port fails.",
)
@click.option(
    "--ticket-lifetime",
    type=FiniteFloatRange(min=0),
    default=86400.0,
    show_default=True,
    help="Seconds a session ticket (resumption, 0-RTT) stays valid; 0 turns tickets off.",
)
@click.option(
    "--stream-timeout",
    type=FiniteFloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds a query has to arrive on its stream before the stream is reset.",
)
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the upstream's answer before SERVFAIL.",
)
@click.option(
    "--max-upstream-queries",
    type=click.IntRange(min=1),
    default=MAX_IN_FLIGHT,
    show_default=True,
    help="With --upstream: queries waiting for it at once; more get SERVFAIL at once.",
)
@click.option(
    "--allow-notify",
    multiple=True,
    metavar="CIDR",
    help="With --upstream: clients that may send NOTIFY (repeatable); others get REFUSED.",
)
@click.option(
    "--user",
    metavar="NAME",
    help="Switch to this user after binding (needs root), like forward --user.",
)
@click.option(
    "--metrics-listen",
    metavar="ADDR:PORT",
    help="Serve Prometheus metrics on http://ADDR:PORT/metrics (e.g. 127.0.0.1:9154).",
)
@click.option("-v", "--verbose", count=True, help="More logging; repeat for more.")
def serve(
    listen: str,
    cert: str,
    key: str,
    upstream: str | None,
    zone: str | None,
    origin: str | None,
    idle_timeout: float,
    max_streams: int,
    max_connections: int,
    max_handshakes: int,
    handshake_timeout: float,
    max_connections_per_ip: int,
    max_connections_per_prefix: int,
    connection_prefix_v4: int,
    connection_prefix_v6: int,
    retry: bool,
    retry_threshold: int,
    reuseport: bool,
    ticket_lifetime: float,
    stream_timeout: float,
    timeout: float,
    max_upstream_queries: int,
    allow_notify: tuple[str, ...],
    user: str | None,
    metrics_listen: str | None,
    verbose: int,
) -> None:
    """Answer DNS-over-QUIC (RFC 9250) from a plain DNS server or a zone file."""
    if allow_notify and upstream is None:
        raise click.ClickException(
            "--allow-notify goes with --upstream (a zone answers NOTIFY with NOTIMP)"
        )
    config = DoqListenerConfig(
        idle_timeout=idle_timeout,
        max_streams=max_streams,
        admission=AdmissionLimits(
            max_connections=max_connections,
            max_handshakes=max_handshakes,
            retry_threshold=0 if retry else (retry_threshold or None),
            max_per_address=max_connections_per_ip,
            max_per_prefix=max_connections_per_prefix,
            prefix_v4=connection_prefix_v4,
            prefix_v6=connection_prefix_v6,
        ),
        handshake_timeout=handshake_timeout,
        notify_from=None if upstream is None else _networks(allow_notify),
        reuseport=reuseport,
        ticket_lifetime=ticket_lifetime,
        stream_timeout=stream_timeout,
    )
    try:
        address = parse_listen(listen, default_port=DEFAULT_PORT)
        metrics = parse_listen(metrics_listen, default_port=9154) if metrics_listen else None
        backend, opcodes = _backend(upstream, zone, origin, max_upstream_queries)
        quic = tls_configuration(cert, key, config)
        sock = bind_udp(address, reuseport=reuseport)
    except (AddressError, ZoneError, ListenError) as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(verbose)
    if user is not None:
        if metrics is not None:
            importlib.import_module("doqproxy.ops.metrics")  # before root's files are out of reach
        try:
            drop_privileges(user)
        except PrivilegeError as exc:
            sock.close()
            raise click.ClickException(str(exc)) from None
    warn_if_root()
    listener = DoqListener(Resolver(backend, timeout=timeout, opcodes=opcodes), quic, config)
    raise SystemExit(run(lambda: _serve(listener, sock, metrics)))


def _networks(texts: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise click.ClickException(f"--allow-notify {text}: not an address or CIDR") from None
    return tuple(networks)


async def _serve(listener: DoqListener, sock: socket.socket, metrics: HostPort | None) -> int:
    host, port = await listener.start(sock)
    exporter = None
    if metrics is not None:
        exporter = MetricsServer(metrics, ServeCollector(listener.stats, listener.resolver))
        try:
            log.info("metrics on http://%s:%d/metrics", *exporter.start())
        except OSError as exc:
            await listener.aclose()
            message = f"cannot serve metrics on {metrics}: {exc.strerror}"
            raise click.ClickException(message) from None
    stop = stop_event()
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    backend = listener.resolver.upstream
    source = backend.url if isinstance(backend, PlainUpstream) else backend.name
    log.info("listening on quic://%s, answering from %s", shown, source)
    await stop.wait()
    await listener.aclose()
    if exporter is not None:
        exporter.stop()
    log.info("stopped: %s", listener.stats)
    return 0
