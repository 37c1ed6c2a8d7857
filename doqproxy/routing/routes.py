"""Route specifications (``--route DOMAIN=UPSTREAM[,UPSTREAM...]``) and the suffix table.

Pure: parsing and lookup only. A route names one or more upstream URLs (or
stamps); the longest matching suffix wins, and ``.`` is the default route, which
the ``-u`` upstreams form unless a route for ``.`` is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from doqproxy.routing.names import DomainError, suffixes, to_text, to_wire

T = TypeVar("T")


class RouteError(ValueError):
    """A route that cannot be used; the message says how to fix it."""


@dataclass(slots=True, frozen=True)
class RouteSpec:
    """One route as configured: its domains and the upstreams (as given) that serve them."""

    domains: tuple[str, ...]
    """Normalised, lower case, with the trailing dot (``"corp.example."``; ``"."``)."""
    upstreams: tuple[str, ...]


def normalise(domain: str) -> str:
    """``"Corp.Example"`` → ``"corp.example."`` (raises :class:`RouteError`)."""
    try:
        return to_text(to_wire(domain))
    except DomainError as exc:
        raise RouteError(str(exc)) from None


def parse_route(text: str) -> RouteSpec:
    """Parse ``DOMAIN[,DOMAIN...]=UPSTREAM[,UPSTREAM...]``."""
    if "=" not in text:
        raise RouteError(
            f"route {text!r}: expected DOMAIN=UPSTREAM, e.g. corp.example=udp://10.0.0.1"
        )
    left, right = text.split("=", 1)
    domains = tuple(normalise(d) for d in left.split(",") if d.strip())
    upstreams = tuple(u.strip() for u in right.split(",") if u.strip())
    if not domains:
        raise RouteError(f"route {text!r}: no domain before '='")
    if not upstreams:
        raise RouteError(f"route {text!r}: no upstream after '='")
    return RouteSpec(domains, upstreams)


def route_from_table(table: Mapping[str, object], where: str) -> RouteSpec:
    """A ``[[route]]`` TOML table: ``domains = [...]``, ``upstreams = [...]``."""
    unknown = set(table) - {"domains", "upstreams"}
    if unknown:
        raise RouteError(
            f"{where}: unknown key {sorted(unknown)[0]!r} in [[route]] (known: domains, upstreams)"
        )
    domains, upstreams = table.get("domains"), table.get("upstreams")
    for key, value in (("domains", domains), ("upstreams", upstreams)):
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise RouteError(f"{where}: [[route]] {key} must be a non-empty list of strings")
    assert isinstance(domains, list) and isinstance(upstreams, list)
    return RouteSpec(tuple(normalise(d) for d in domains), tuple(upstreams))


def check_unique(specs: Iterable[RouteSpec]) -> None:
    """A domain may appear in one route only (a name has exactly one route)."""
    seen: dict[str, RouteSpec] = {}
    for spec in specs:
        for domain in spec.domains:
            if domain in seen and seen[domain] != spec:
                raise RouteError(f"route for {domain} is given twice; merge them into one")
            seen[domain] = spec


class RouteTable(Generic[T]):
    """Longest-suffix lookup from a name (wire form) to a value; the root is the default."""

    def __init__(self, routes: Mapping[str, T], default: T) -> None:
        self._routes = {to_wire(domain): value for domain, value in routes.items()}
        self._routes.setdefault(b"\x00", default)
        self.default = self._routes[b"\x00"]
        self._explicit = len(self._routes) > 1

    def lookup(self, qname: bytes) -> tuple[bytes, T]:
        """The matching route's domain (wire) and value."""
        if not self._explicit:
            return b"\x00", self.default
        name = qname.lower()
        routes = self._routes
        for _, suffix in suffixes(name):
            value = routes.get(suffix)
            if value is not None:
                return suffix, value
        return b"\x00", self.default  # unreachable: the root is always there

    def domains(self) -> list[str]:
        """Every route's domain as text, the root included."""
        return [to_text(domain) for domain in self._routes]


@dataclass(slots=True, frozen=True)
class RoutingSettings:
    """Routes, locally served names, bootstrap, pinned addresses and fallback."""

    routes: tuple[RouteSpec, ...] = ()
    local_zones: bool = True
    fallback: tuple[str, ...] = ()
    """Upstreams used only while a route's DoQ upstreams all fail."""
    bootstrap: tuple[str, ...] = ()
    """``IP:PORT`` of plain DNS servers that resolve upstream host names."""
    addresses: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Host name → pinned IP addresses (used instead of resolving it)."""
    pins: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Host name → accepted SPKI SHA-256 digests (base64)."""

    def route_map(self) -> dict[str, tuple[str, ...]]:
        """Domain → its upstreams as given."""
        return {domain: spec.upstreams for spec in self.routes for domain in spec.domains}

    def addresses_for(self, host: str) -> tuple[str, ...]:
        return dict(self.addresses).get(host.lower().rstrip("."), ())

    def pins_for(self, host: str) -> tuple[str, ...]:
        return dict(self.pins).get(host.lower().rstrip("."), ())
