"""The :class:`Router`: one :class:`~doqproxy.upstream.base.Upstream` that sends each
query to its route's upstream, chosen by the longest matching suffix of the name."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from doqproxy.dns.padding import repad
from doqproxy.dns.wire import Question
from doqproxy.routing.names import to_text, to_wire
from doqproxy.routing.routes import RouteTable
from doqproxy.upstream import answered
from doqproxy.upstream.base import Upstream, UpstreamError


class Router:
    """Dispatches by qname. ``routes`` maps domains (text, ``"corp.example."``) to
    upstreams; ``"."``, or else ``default``, takes everything else.

    The resolver pads queries for the default route's upstream; a query routed to
    an upstream with another padding block (plain DNS: none) is re-padded here, so
    that padding only ever goes to encrypted upstreams.
    """

    def __init__(self, routes: Mapping[str, Upstream], default: Upstream) -> None:
        self.table: RouteTable[Upstream] = RouteTable(routes, default)
        self.default = self.table.default
        self.name = self.default.name
        self.pad_block = self.default.pad_block
        self.specs: dict[str, str] = {}
        """Domain → the route's description, compared on reload (see :func:`changed_domains`)."""

    async def query(self, message: bytes, question: Question) -> bytes:
        domain, upstream = self.table.lookup(question.qname)
        if upstream is self.default:
            return await upstream.query(message, question)
        if upstream.pad_block != self.pad_block:
            message = repad(message, upstream.pad_block)
        since = answered.mark()
        try:
            reply = await upstream.query(message, question)
            answered.note(upstream.name, since)
            return reply
        except UpstreamError as exc:
            raise UpstreamError(
                f"{upstream.name} (route {to_text(domain)}): {exc}", exc.ede
            ) from None

    def upstreams(self) -> list[Upstream]:
        """Every distinct upstream, the default route's first."""
        found: list[Upstream] = [self.default]
        for domain in self.table.domains():
            _, upstream = self.table.lookup(to_wire(domain))
            if all(upstream is not known for known in found):
                found.append(upstream)
        return found

    async def aclose(self) -> None:
        """Nothing to do: the routes' upstreams belong to whoever made them
        (:class:`~doqproxy.routing.build.RouteBuilder`, the forwarder)."""


def changed_domains(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Domains whose route differs between two ``{domain: description}`` maps
    (added, removed or pointing elsewhere)."""
    return sorted(d for d in set(old) | set(new) if old.get(d) != new.get(d))


def affected(domains: list[str], routes: Mapping[str, str]) -> Callable[[bytes], bool]:
    """A predicate on cached names (wire): does the name's route change?

    A name belongs to the longest route domain that covers it, in either the old
    or the new table; it is affected when that domain is one of ``domains``. The
    default route ``.`` changing affects every name not under another route.
    """
    changed = {to_wire(d) for d in domains}
    table: RouteTable[bool] = RouteTable(
        {d: to_wire(d) in changed for d in {*routes, *domains}}, b"\x00" in changed
    )

    def predicate(name: bytes) -> bool:
        return table.lookup(name)[1]

    return predicate
