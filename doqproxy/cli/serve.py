"""``doqproxy serve``: answer DNS-over-QUIC from a plain DNS server or from a zone file."""

from __future__ import annotations

import logging

import click

from doqproxy.dns import wire
from doqproxy.doq.framing import DEFAULT_PORT
from doqproxy.frontend.doq import DoqListener, DoqListenerConfig, ListenError, tls_configuration
from doqproxy.net.addresses import AddressError, HostPort, parse_listen, parse_upstream
from doqproxy.ops.metrics import MetricsServer, ServeCollector
from doqproxy.ops.process import run, setup_logging, stop_event
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.plain import PlainUpstream
from doqproxy.upstream.zone import ZoneBackend, ZoneError

log = logging.getLogger("doqproxy.serve")

FORWARD_OPCODES = frozenset({wire.OPCODE_QUERY, wire.OPCODE_NOTIFY})
"""A plain DNS server behind DoQ may be a secondary that wants NOTIFY; pass it on."""
ZONE_OPCODES = frozenset({wire.OPCODE_QUERY})
"""The zone backend only answers queries; NOTIFY and the rest get NOTIMP."""


def _backend(
    upstream: str | None, zone: str | None, origin: str | None
) -> tuple[Upstream, frozenset[int]]:
    if (upstream is None) == (zone is None):
        raise click.ClickException(
            "give exactly one of --upstream udp://HOST[:PORT] or --zone FILE"
        )
    if upstream is not None:
        if origin is not None:
            raise click.ClickException("--origin goes with --zone, not --upstream")
        return PlainUpstream(parse_upstream(upstream, schemes=("udp",))), FORWARD_OPCODES
    assert zone is not None
    return ZoneBackend.from_file(zone, origin), ZONE_OPCODES


@click.command()
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
    type=click.FloatRange(min=1),
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
    default=1000,
    show_default=True,
    help="Open connections; more are refused.",
)
@click.option("--retry", is_flag=True, help="Validate client addresses with a stateless Retry.")
@click.option(
    "--reuseport",
    is_flag=True,
    help="Share the port with other serve processes (SO_REUSEPORT); else a taken port fails.",
)
@click.option(
    "--ticket-lifetime",
    type=click.FloatRange(min=0),
    default=86400.0,
    show_default=True,
    help="Seconds a session ticket (resumption, 0-RTT) stays valid; 0 turns tickets off.",
)
@click.option(
    "--stream-timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds a query has to arrive on its stream before the stream is reset.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the upstream's answer before SERVFAIL.",
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
    retry: bool,
    reuseport: bool,
    ticket_lifetime: float,
    stream_timeout: float,
    timeout: float,
    metrics_listen: str | None,
    verbose: int,
) -> None:
    """Answer DNS-over-QUIC (RFC 9250) from a plain DNS server or a zone file."""
    config = DoqListenerConfig(
        idle_timeout=idle_timeout,
        max_streams=max_streams,
        max_connections=max_connections,
        retry=retry,
        reuseport=reuseport,
        ticket_lifetime=ticket_lifetime,
        stream_timeout=stream_timeout,
    )
    try:
        address = parse_listen(listen, default_port=DEFAULT_PORT)
        metrics = parse_listen(metrics_listen, default_port=9154) if metrics_listen else None
        backend, opcodes = _backend(upstream, zone, origin)
        quic = tls_configuration(cert, key, config)
    except (AddressError, ZoneError, ListenError) as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(verbose)
    listener = DoqListener(Resolver(backend, timeout=timeout, opcodes=opcodes), quic, config)
    raise SystemExit(run(lambda: _serve(listener, address, metrics)))


async def _serve(listener: DoqListener, address: HostPort, metrics: HostPort | None) -> int:
    try:
        host, port = await listener.start(address)
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None
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
    log.info("listening on quic://%s, answering from %s", shown, listener.resolver.upstream.name)
    await stop.wait()
    await listener.aclose()
    if exporter is not None:
        exporter.stop()
    log.info("stopped: %s", listener.stats)
    return 0
