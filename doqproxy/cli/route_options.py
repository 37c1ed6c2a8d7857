"""The routing, local-zone, bootstrap, pinning and fallback options of ``doqproxy forward``.

In the TOML file, ``[[route]]`` tables (``domains``, ``upstreams``) are the same
as ``--route`` flags; see :func:`flatten_route_tables`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from doqproxy.net.addresses import AddressError, is_ip_literal, parse_listen
from doqproxy.net.stamps import StampError
from doqproxy.routing.routes import (
    RouteError,
    RoutingSettings,
    check_unique,
    parse_route,
    route_from_table,
)
from doqproxy.upstream.targets import Target, parse_target

F = TypeVar("F", bound=Callable[..., Any])

ROUTE_FLAGS = (
    "route",
    "no_local_zones",
    "fallback",
    "bootstrap",
    "upstream_address",
    "tls_pin_sha256",
)
"""The keyword arguments :func:`route_options` adds to a command."""

ROUTE_SCHEMES = ("quic", "tls", "udp")


def route_options(command: F) -> F:
    """Add the routing options to a click command."""
    options = [
        click.option(
            "--route",
            multiple=True,
            metavar="DOMAIN=UPSTREAM[,UPSTREAM...]",
            help="Send DOMAIN and the names below it to these upstreams (quic://, tls://, "
            "udp:// or sdns://); repeatable; the longest matching suffix wins.",
        ),
        click.option(
            "--no-local-zones",
            is_flag=True,
            help="Forward localhost., local., invalid., onion., home.arpa. and the private "
            "reverse zones instead of answering them here.",
        ),
        click.option(
            "--fallback",
            multiple=True,
            metavar="UPSTREAM",
            help="Used only while every DoQ upstream of a route fails (tls://, or udp:// "
            "if you accept plain DNS); repeatable.",
        ),
        click.option(
            "--bootstrap",
            multiple=True,
            metavar="udp://IP[:PORT]",
            help="Plain DNS server that resolves upstream host names; repeatable.",
        ),
        click.option(
            "--upstream-address",
            multiple=True,
            metavar="HOST=IP[,IP...]",
            help="Connect to HOST at these addresses instead of resolving it; repeatable.",
        ),
        click.option(
            "--tls-pin-sha256",
            multiple=True,
            metavar="HOST=BASE64",
            help="Accept HOST only if its certificate's public key (SPKI) has this SHA-256; "
            "repeatable (several pins for one host: any may match).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def routing_settings(params: dict[str, Any]) -> RoutingSettings:
    """Build :class:`RoutingSettings` from the options' values (raises ClickException)."""
    try:
        routes = tuple(parse_route(text) for text in params["route"])
        check_unique(routes)
        for spec in routes:
            for text in spec.upstreams:
                parse_target(text, ROUTE_SCHEMES)
        for text in params["fallback"]:
            target = parse_target(text, ("tls", "udp", "quic"))
            del target
    except (RouteError, AddressError, StampError) as exc:
        raise click.ClickException(str(exc)) from None
    bootstrap = []
    for text in params["bootstrap"]:
        address = text.removeprefix("udp://")
        if "://" in address:
            raise click.ClickException(f"--bootstrap {text}: only udp://IP[:PORT] is accepted")
        try:
            bootstrap.append(str(parse_listen(address, 53)))
        except AddressError as exc:
            raise click.ClickException(f"--bootstrap {text}: {exc}") from None
    return RoutingSettings(
        routes=routes,
        local_zones=not params["no_local_zones"],
        fallback=tuple(params["fallback"]),
        bootstrap=tuple(bootstrap),
        addresses=_host_map("--upstream-address", params["upstream_address"], _check_ip),
        pins=_host_map("--tls-pin-sha256", params["tls_pin_sha256"], _check_pin),
    )


def _check_ip(text: str) -> str:
    if not is_ip_literal(text):
        raise ValueError(f"{text!r} is not an IP address")
    return text


def _check_pin(text: str) -> str:
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{text!r} is not base64") from None
    if len(digest) != 32:
        raise ValueError(f"{text!r} is not a SHA-256 digest (32 octets in base64)")
    return text


def _host_map(
    flag: str, values: tuple[str, ...], check: Callable[[str], str]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    found: dict[str, list[str]] = {}
    for text in values:
        host, sep, rest = text.partition("=")
        if not sep or not host or not rest:
            raise click.ClickException(f"{flag} {text!r}: expected HOST=VALUE[,VALUE...]")
        try:
            items = [check(item.strip()) for item in rest.split(",") if item.strip()]
        except ValueError as exc:
            raise click.ClickException(f"{flag} {text!r}: {exc}") from None
        found.setdefault(host.lower().rstrip("."), []).extend(items)
    return tuple((host, tuple(items)) for host, items in found.items())


def with_stamp_addresses(routing: RoutingSettings, target: Target) -> RoutingSettings:
    """Add the address a stamp given as ``-u`` carries, unless the host is pinned already."""
    host = target.url.host.lower().rstrip(".")
    if not target.addresses or routing.addresses_for(host):
        return routing
    return dataclasses.replace(routing, addresses=(*routing.addresses, (host, target.addresses)))


def upstream_names(settings: Any) -> list[str]:
    """Host names of the encrypted upstreams that will need a lookup (no pinned address)."""
    routing: RoutingSettings = settings.routing
    texts = [text for spec in routing.routes for text in spec.upstreams] + list(routing.fallback)
    hosts = [spec.url.host for spec in settings.upstreams if not spec.addresses]
    for text in texts:
        target = parse_target(text, ROUTE_SCHEMES)
        if target.scheme != "udp" and not target.addresses:
            hosts.append(target.url.host)
    return [h for h in hosts if not routing.addresses_for(h)]


def per_host_entries(path: str, key: str, url: object, value: object) -> str:
    """``addresses = [...]`` or ``tls-pin-sha256 = "..."`` of an ``[[upstream]]`` table
    as the ``HOST=VALUE,...`` form of the flags."""
    if not isinstance(url, str):
        raise click.ClickException(f'{path}: [[upstream]] needs url = "quic://HOST[:PORT]"')
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise click.ClickException(f"{path}: {key} in [[upstream]] must be a list of strings")
    try:
        host = parse_target(url, ("quic",)).url.host
    except (AddressError, StampError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    return f"{host}=" + ",".join(values)


def flatten_route_tables(path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``[[route]]`` tables become ``route = ["DOMAIN,...=UPSTREAM,..."]`` entries."""
    tables = raw.get("route")
    if (
        tables is None
        or not isinstance(tables, list)
        or not all(isinstance(t, dict) for t in tables)
    ):
        return raw
    flat = dict(raw)
    try:
        specs = [route_from_table(table, path) for table in tables]
    except RouteError as exc:
        raise click.ClickException(str(exc)) from None
    flat["route"] = [",".join(s.domains) + "=" + ",".join(s.upstreams) for s in specs]
    return flat
