"""``doqproxy forward`` options for running on a LAN: access list, rate limits, TCP fairness."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from doqproxy.cli.types import FiniteFloatRange
from doqproxy.frontend.access import AccessError, parse_allow
from doqproxy.frontend.admission import AccessSettings
from doqproxy.frontend.tcp import TcpLimits

F = TypeVar("F", bound=Callable[..., Any])

_ACCESS = AccessSettings()
_TCP = TcpLimits()

ACCESS_FLAGS = (
    "allow",
    "refused_action",
    "ratelimit",
    "ratelimit_prefix_v4",
    "ratelimit_prefix_v6",
    "ratelimit_slip",
    "ratelimit_errors",
    "no_refuse_any",
    "ede_detail",
    "max_in_flight",
    "tcp_max_connections_per_prefix",
    "tcp_max_connection_age",
    "tcp_write_budget",
)
"""The keyword arguments :func:`access_options` adds to a command."""


def access_options(command: F) -> F:
    """Add the access-control, rate-limit and TCP-fairness options to a click command."""
    options = [
        click.option(
            "--allow",
            multiple=True,
            metavar="CIDR|any",
            help="Answer clients in this network; repeatable. Loopback is always allowed. "
            "Default: loopback plus the subnets of the listen addresses' interfaces. "
            "'any': an open resolver.",
        ),
        click.option(
            "--refused-action",
            type=click.Choice(["drop", "refuse"]),
            default=_ACCESS.refused_action,
            show_default=True,
            help="What a UDP client outside --allow gets (TCP clients always get REFUSED).",
        ),
        click.option(
            "--ratelimit",
            type=FiniteFloatRange(min=0),
            default=None,
            metavar="QPS",
            help="UDP queries a second per client prefix; 0: off. Default: 100 when a listen "
            "address is reachable from other hosts, off on loopback-only listeners.",
        ),
        click.option(
            "--ratelimit-prefix-v4",
            type=click.IntRange(min=8, max=32),
            default=_ACCESS.ratelimit_prefix_v4,
            show_default=True,
            help="IPv4 clients sharing this prefix share a rate limit and TCP slots.",
        ),
        click.option(
            "--ratelimit-prefix-v6",
            type=click.IntRange(min=16, max=128),
            default=_ACCESS.ratelimit_prefix_v6,
            show_default=True,
            help="IPv6 clients sharing this prefix share a rate limit and TCP slots.",
        ),
        click.option(
            "--ratelimit-slip",
            type=click.IntRange(min=0, max=10),
            default=_ACCESS.ratelimit_slip,
            show_default=True,
            help="Over the limit, answer every Nth query with an empty TC=1 reply (0: never).",
        ),
        click.option(
            "--ratelimit-errors",
            type=FiniteFloatRange(min=0, min_open=True),
            default=None,
            metavar="QPS",
            help="Error replies (FORMERR, REFUSED, SERVFAIL...) a second per client prefix "
            "over UDP while rate limiting is on. Default: a fifth of --ratelimit.",
        ),
        click.option(
            "--no-refuse-any",
            is_flag=True,
            help="Forward ANY over UDP instead of the minimal RFC 8482 answer.",
        ),
        click.option(
            "--ede-detail",
            type=click.Choice(["code", "full"]),
            default=_ACCESS.ede_detail,
            show_default=True,
            help="'code': Extended DNS Error text (it names the upstream) for loopback "
            "clients only; 'full': for every client.",
        ),
        click.option(
            "--max-in-flight",
            type=click.IntRange(min=1),
            default=_ACCESS.max_in_flight,
            show_default=True,
            help="Queries being answered at once; beyond it, SERVFAIL at once.",
        ),
        click.option(
            "--tcp-max-connections-per-prefix",
            type=click.IntRange(min=1),
            default=_TCP.max_connections_per_prefix,
            show_default=True,
            help="Client TCP connections from one /24 or /56 (--ratelimit-prefix-v4/-v6).",
        ),
        click.option(
            "--tcp-max-connection-age",
            type=FiniteFloatRange(min=1),
            default=_TCP.max_age,
            show_default=True,
            help="Seconds a client TCP connection may live.",
        ),
        click.option(
            "--tcp-write-budget",
            type=click.IntRange(min=65536),
            default=_TCP.write_budget,
            show_default=True,
            help="Octets of unsent answers across all TCP clients; past it the client "
            "holding most is disconnected.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def access_settings(params: dict[str, Any]) -> AccessSettings:
    """:class:`AccessSettings` from the options' values (raises click.ClickException)."""
    allow = tuple(params["allow"])
    try:
        parse_allow(allow)
    except AccessError as exc:
        raise click.ClickException(str(exc)) from None
    return AccessSettings(
        allow=allow,
        refused_action=params["refused_action"],
        ratelimit=params["ratelimit"],
        ratelimit_prefix_v4=params["ratelimit_prefix_v4"],
        ratelimit_prefix_v6=params["ratelimit_prefix_v6"],
        ratelimit_slip=params["ratelimit_slip"],
        ratelimit_errors=params["ratelimit_errors"],
        refuse_any=not params["no_refuse_any"],
        ede_detail=params["ede_detail"],
        max_in_flight=params["max_in_flight"],
    )


def tcp_limits(params: dict[str, Any], base: TcpLimits) -> TcpLimits:
    """``base`` with the TCP fairness options applied."""
    return dataclasses.replace(
        base,
        max_connections_per_prefix=params["tcp_max_connections_per_prefix"],
        max_age=params["tcp_max_connection_age"],
        write_budget=params["tcp_write_budget"],
    )
