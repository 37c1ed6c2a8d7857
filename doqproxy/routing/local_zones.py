"""Names answered on this machine, never sent to any upstream (Unbound's defaults).

- ``localhost.`` (RFC 6761 §6.3): every name in it is 127.0.0.1 and ::1.
- ``invalid.``, ``local.`` (RFC 6762), ``onion.`` (RFC 7686), ``home.arpa.``
  (RFC 8375): NXDOMAIN.
- The reverse zones of private and special address ranges (RFC 6303 §4 and the
  IANA Locally-Served DNS Zones registry): NXDOMAIN, except the PTR records of
  127.0.0.1 and ::1, which name ``localhost.``.

Every negative answer carries the zone's SOA in the authority section, so that
clients cache it (RFC 2308) for the SOA's MINIMUM, 3 hours like Unbound. ``test.``
is left to the upstream (RFC 6761 lets resolvers pass it on).

Answers are built as wire bytes from the parsed question; no message object is
involved. A zone is not served locally when an explicit route covers the name:
``--route 168.192.in-addr.arpa=udp://192.168.1.1`` sends those PTR queries to the
router instead.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from doqproxy.dns import wire
from doqproxy.dns.wire import Question
from doqproxy.routing.names import is_subdomain, suffixes, to_wire

TTL = 10800
"""TTL of local records, and the SOA MINIMUM (negative caching time)."""

CLASS_IN = 1
TYPE_A = 1
TYPE_NS = 2
TYPE_PTR = 12
TYPE_AAAA = 28
_RR = struct.Struct("!HHHIH")  # owner pointer, type, class, ttl, rdlength
_LOCALHOST = to_wire("localhost.")
_SOA_RDATA = (
    _LOCALHOST + to_wire("nobody.invalid.") + struct.pack("!IIIII", 1, 3600, 1200, 604800, TTL)
)


def _reverse_v4(prefix: str) -> list[str]:
    """The in-addr.arpa zones covering an IPv4 prefix whose length is a multiple of 8,
    or (for other lengths) one zone per /8-boundary value inside it."""
    network = ipaddress.IPv4Network(prefix)
    octets = network.prefixlen // 8
    if network.prefixlen % 8 == 0:
        return [".".join(reversed(str(network.network_address).split(".")[:octets])) + "."]
    step = 2 ** (8 - network.prefixlen % 8)
    first = int(str(network.network_address).split(".")[octets])
    head = list(reversed(str(network.network_address).split(".")[:octets]))
    return [".".join([str(v), *head]) + "." for v in range(first, first + step)]


def _default_zone_names() -> list[str]:
    v4 = [
        "0.0.0.0/8",  # "this" network
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (RFC 6598, RFC 7793)
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.2.0/24",  # TEST-NET-1
        "192.168.0.0/16",
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
    ]
    names = [zone + "in-addr.arpa." for prefix in v4 for zone in _reverse_v4(prefix)]
    names.append("255.255.255.255.in-addr.arpa.")  # broadcast
    names += [
        "0." * 32 + "ip6.arpa.",  # ::
        "1." + "0." * 31 + "ip6.arpa.",  # ::1
        "c.f.ip6.arpa.",  # fc00::/7, unique local (RFC 4193)
        "d.f.ip6.arpa.",
        "8.e.f.ip6.arpa.",  # fe80::/10, link local
        "9.e.f.ip6.arpa.",
        "a.e.f.ip6.arpa.",
        "b.e.f.ip6.arpa.",
        "8.b.d.0.1.0.0.2.ip6.arpa.",  # 2001:db8::/32, documentation
    ]
    return ["localhost.", "invalid.", "local.", "onion.", "home.arpa.", *names]


DEFAULT_ZONES: tuple[str, ...] = tuple(_default_zone_names())
"""Every locally served zone, as text."""


@dataclass(slots=True, frozen=True)
class _Zone:
    apex: bytes
    redirect: bool = False
    """Every name in the zone answers like the apex (``localhost.``)."""
    records: dict[tuple[bytes, int], tuple[bytes, ...]] = field(default_factory=dict)
    """(owner, type) → RDATAs, besides the apex SOA and NS."""


def _default_zones() -> dict[bytes, _Zone]:
    zones = {to_wire(name): _Zone(to_wire(name)) for name in DEFAULT_ZONES}
    zones[_LOCALHOST] = _Zone(
        _LOCALHOST,
        redirect=True,
        records={
            (_LOCALHOST, TYPE_A): (bytes([127, 0, 0, 1]),),
            (_LOCALHOST, TYPE_AAAA): (ipaddress.IPv6Address("::1").packed,),
        },
    )
    v4_loop = to_wire("127.in-addr.arpa.")
    zones[v4_loop] = _Zone(
        v4_loop, records={(to_wire("1.0.0.127.in-addr.arpa."), TYPE_PTR): (_LOCALHOST,)}
    )
    v6_loop = to_wire("1." + "0." * 31 + "ip6.arpa.")
    zones[v6_loop] = _Zone(v6_loop, records={(v6_loop, TYPE_PTR): (_LOCALHOST,)})
    return zones


def _last_label(name: bytes) -> bytes:
    """The top-level label of a wire name with the root, e.g. ``b"\\x04arpa\\x00"``."""
    last = b"\x00"
    for _, suffix in suffixes(name):
        if suffix != b"\x00":
            last = suffix
    return last


class LocalZones:
    """Answers queries for the locally served zones, except where a route says otherwise.

    ``routed`` are the domains of explicit routes (not the default route ``.``): a
    name at or below one of them is left to its route.
    """

    def __init__(self, routed: Iterable[str] = (), *, enabled: bool = True) -> None:
        self._zones = _default_zones() if enabled else {}
        self._routed = frozenset(to_wire(domain) for domain in routed) - {b"\x00"}
        # Every local zone ends in one of a few top-level labels (arpa., localhost.,
        # ...): a name that ends in none of them (nearly every query) is out at once.
        self._tails = tuple({_last_label(apex) for apex in self._zones})

    def __bool__(self) -> bool:
        return bool(self._zones)

    def zone_of(self, qname: bytes) -> bytes | None:
        """The apex (lower-case wire) of the local zone that serves ``qname``, if any."""
        name = qname.lower()
        if not self._zones or not name.endswith(self._tails):
            return None
        found: bytes | None = None
        for _, suffix in suffixes(name):
            if suffix in self._routed:
                return None
            if found is None and suffix in self._zones:
                found = suffix
        return found

    def reply(self, question: Question, *, payload: int = 1232) -> bytes | None:
        """The answer to ``question`` if a local zone serves it, else ``None``;
        ``payload`` is the UDP size our OPT record advertises."""
        if question.qclass != CLASS_IN or question.opcode != wire.OPCODE_QUERY:
            return None
        apex = self.zone_of(question.qname)
        if apex is None:
            return None
        zone = self._zones[apex]
        return _answer(question, zone, payload)


def _answer(question: Question, zone: _Zone, payload: int) -> bytes:
    qname = question.qname
    name = qname.lower()
    apex_at = wire.HEADER_LEN + len(qname) - len(zone.apex)
    owner = zone.apex if zone.redirect else name
    rcode = wire.RCODE_NOERROR
    answers: list[bytes] = []
    rdatas = zone.records.get((owner, question.qtype))
    if rdatas:
        answers = [_record(wire.HEADER_LEN, question.qtype, rdata) for rdata in rdatas]
    elif owner == zone.apex and question.qtype == wire.TYPE_SOA:
        answers = [_record(wire.HEADER_LEN, wire.TYPE_SOA, _SOA_RDATA)]
    elif owner == zone.apex and question.qtype == TYPE_NS:
        answers = [_record(wire.HEADER_LEN, TYPE_NS, _LOCALHOST)]
    elif owner != zone.apex and not any(is_subdomain(key[0], owner) for key in zone.records):
        rcode = wire.RCODE_NXDOMAIN  # neither a name with records nor above one (RFC 8020)
    authority = [] if answers else [_record(apex_at, wire.TYPE_SOA, _SOA_RDATA)]
    opt = b""
    if question.edns is not None:
        opt = wire.encode_opt(payload, flags=question.edns.flags & wire.EDNS_DO)
    header = wire.response_header(
        question,
        rcode,
        extra_flags=wire.FLAG_AA,
        counts=(1, len(answers), len(authority), 1 if opt else 0),
    )
    tail = struct.pack("!HH", question.qtype, question.qclass)
    return b"".join((header, qname, tail, *answers, *authority, opt))


def _record(owner_at: int, rrtype: int, rdata: bytes) -> bytes:
    return _RR.pack(0xC000 | owner_at, rrtype, CLASS_IN, TTL, len(rdata)) + rdata


def covers(zone: str, name: str) -> bool:
    """Whether the text ``name`` is at or below the text ``zone``."""
    return is_subdomain(to_wire(name), to_wire(zone))
