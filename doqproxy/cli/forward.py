"""``doqproxy forward``: plain DNS over UDP and TCP in, DNS-over-QUIC out."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import click

from doqproxy import forwarder
from doqproxy.cli import config
from doqproxy.cli.access_options import access_options, access_settings, tcp_limits
from doqproxy.cli.cache_options import cache_options, cache_settings
from doqproxy.cli.pool_options import pool_options, pool_settings
from doqproxy.cli.route_options import (
    route_options,
    routing_settings,
    upstream_names,
    with_stamp_addresses,
)
from doqproxy.cli.types import FiniteFloatRange
from doqproxy.cli.upstream_options import upstream_options, upstream_settings
from doqproxy.frontend.tcp import TcpLimits
from doqproxy.net.addresses import AddressError, parse_listen
from doqproxy.net.sockets import ListenError
from doqproxy.net.stamps import StampError
from doqproxy.ops import early, process, systemd
from doqproxy.ops.control import OpsSettings
from doqproxy.ops.privileges import (
    PrivilegeError,
    drop_privileges,
    prepare_state_dir,
    warn_if_root,
)
from doqproxy.settings import ForwardSettings
from doqproxy.upstream.bootstrap import BootstrapError, check_no_loop
from doqproxy.upstream.targets import Target
from doqproxy.upstream.tickets import StateDirError, check_state_dir


@click.command(cls=config.ConfigCommand)
@click.option(
    "-l",
    "--listen",
    "listen",
    multiple=True,
    default=("127.0.0.53:53",),
    show_default=True,
    metavar="ADDR:PORT",
    help="Address for UDP and TCP; repeatable. IPv6 as [::1]:5353.",
)
@upstream_options
@click.option("--tls-ca-file", metavar="PATH", help="Trust these CAs instead of the system store.")
@click.option(
    "--tls-server-name",
    metavar="NAME",
    help="Name to verify in the server certificate (for an IP literal upstream).",
)
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds before an unanswered query gets SERVFAIL.",
)
@click.option("--no-padding", is_flag=True, help="Do not pad queries (RFC 8467).")
@click.option(
    "--max-udp-size",
    type=click.IntRange(512, 65535),
    default=1232,
    show_default=True,
    help="Largest UDP reply; larger answers get TC=1 so the client retries over TCP.",
)
@click.option(
    "--udp-reader",
    type=click.Choice(["auto", "drain", "protocol"]),
    default="auto",
    show_default=True,
    help="How UDP queries are read: drain the socket in one callback, or one protocol "
    "callback per datagram; auto: drain on the standard asyncio loop (3.5x faster there), "
    "protocol on uvloop (no clear difference).",
)
@click.option(
    "--tcp-idle-timeout",
    type=FiniteFloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds an idle client TCP connection is kept open.",
)
@click.option(
    "--tcp-message-timeout",
    type=FiniteFloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds a client may take to send one whole TCP message.",
)
@click.option(
    "--tcp-max-connections",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Client TCP connections in total.",
)
@click.option(
    "--tcp-max-connections-per-ip",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Client TCP connections from one IP address.",
)
@click.option(
    "--metrics-listen",
    metavar="ADDR:PORT",
    help="Serve Prometheus metrics on http://ADDR:PORT/metrics (e.g. 127.0.0.1:9153).",
)
@click.option(
    "--query-log",
    metavar="PATH|-",
    help="Log every query as a JSON line to PATH (appended; reopened on SIGHUP) or - (stdout).",
)
@click.option(
    "--user",
    metavar="NAME",
    help="Switch to this user after binding when started as root (not needed under systemd).",
)
@pool_options
@cache_options
@route_options
@access_options
@click.option("-v", "--verbose", count=True, help="More logging; -vvv includes QUIC packets.")
def forward(
    listen: tuple[str, ...],
    tls_ca_file: str | None,
    tls_server_name: str | None,
    timeout: float,
    no_padding: bool,
    max_udp_size: int,
    udp_reader: str,
    tcp_idle_timeout: float,
    tcp_message_timeout: float,
    tcp_max_connections: int,
    tcp_max_connections_per_ip: int,
    metrics_listen: str | None,
    query_log: str | None,
    user: str | None,
    verbose: int,
    **options: Any,
) -> None:
    """Forward plain DNS (UDP and TCP) to DNS-over-QUIC upstreams.

    \b
    Examples:
      doqproxy forward -l 127.0.0.1:5353 -u quic://dns.adguard-dns.com
      doqproxy forward -u quic://dns.adguard-dns.com -u quic://dns.nextdns.io
    """
    early.hold_sighup()  # until the reload handler is in place (Operations.start)
    try:
        addresses = tuple(parse_listen(text) for text in listen)
    except (AddressError, StampError) as exc:
        raise click.ClickException(str(exc)) from None
    upstreams, selection = upstream_settings(options, check_ca_file)
    routing = routing_settings(options)
    for spec in upstreams:  # a stamp carries the address to use
        routing = with_stamp_addresses(routing, Target(spec.url, spec.addresses))
    if tls_ca_file is not None:
        check_ca_file(tls_ca_file)
    try:
        metrics_address = parse_listen(metrics_listen, 9153) if metrics_listen else None
    except AddressError as exc:
        raise click.ClickException(f"--metrics-listen: {exc}") from None
    pool, state_dir = pool_settings(options, padding=not no_padding)
    settings = ForwardSettings(
        listen=addresses,
        pool=pool,
        state_dir=state_dir,
        upstreams=upstreams,
        selection=selection,
        tls_ca_file=tls_ca_file,
        tls_server_name=tls_server_name,
        timeout=timeout,
        padding=not no_padding,
        max_udp_size=max_udp_size,
        udp_reader=udp_reader,
        tcp=tcp_limits(
            options,
            TcpLimits(
                idle_timeout=tcp_idle_timeout,
                message_timeout=tcp_message_timeout,
                max_connections=tcp_max_connections,
                max_connections_per_ip=tcp_max_connections_per_ip,
            ),
        ),
        access=access_settings(options),
        ops=OpsSettings(
            metrics_listen=metrics_address, query_log=query_log, user=user, verbose=verbose
        ),
        cache=cache_settings(options),
        routing=routing,
    )
    if config.deliver(settings):  # check-config or a reload: settings only
        return
    try:
        check_no_loop(
            upstream_names(settings),
            [(a.host, a.port) for a in settings.listen],
            bootstrap=bool(settings.routing.bootstrap),
            servers=settings.routing.bootstrap,
        )
    except BootstrapError as exc:
        raise click.ClickException(str(exc)) from None
    process.setup_logging(verbose)
    try:
        sockets = systemd.listen_sockets() or forwarder.bind_all(settings)
    except systemd.ActivationError as exc:
        raise click.ClickException(f"socket activation: {exc}") from None
    except ListenError as exc:
        raise click.ClickException(exc.strerror or str(exc)) from None
    if user is not None:
        if metrics_address is not None:
            importlib.import_module("doqproxy.ops.metrics")  # before root's files are out of reach
        try:
            if settings.state_dir is not None and os.geteuid() == 0:
                problem = prepare_state_dir(
                    settings.state_dir, user, default=options.get("state_dir") is None
                )
                if problem is not None:
                    logging.getLogger("doqproxy").warning("%s", problem)
            drop_privileges(user)
        except PrivilegeError as exc:
            raise click.ClickException(str(exc)) from None
    warn_if_root()
    try:
        if settings.state_dir is not None:
            check_state_dir(settings.state_dir)
    except StateDirError as exc:
        raise click.ClickException(str(exc)) from None
    reload = config.reloader()
    raise SystemExit(process.run(lambda: forwarder.serve(settings, sockets, reload)))


def check_ca_file(path: str) -> None:
    """Fail with one line unless ``path`` is a readable PEM file with a certificate."""
    if not os.path.exists(path):
        raise click.ClickException(f"--tls-ca-file {path}: no such file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise click.ClickException(f"--tls-ca-file {path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise click.ClickException(f"--tls-ca-file {path}: no PEM certificate in the file")
