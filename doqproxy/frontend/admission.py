"""What happens to a query before it reaches the resolver, and to its reply after.

The UDP and TCP front ends ask an :class:`Admission` about every query. It
applies, in order: the reflection guard (UDP source ports), the access list,
the per-prefix rate limit (UDP), the cache-snooping rule (RD=0 from a
non-loopback client is REFUSED, as Unbound does without ``allow-snoop``) and
the RFC 8482 minimal answer to ANY over UDP. On the way back, error replies
to UDP clients spend from a smaller bucket of their own, so a flood of bad
queries cannot turn us into a FORMERR cannon, and the Extended DNS Error
text, which names the upstream, is kept for loopback clients only.

Pure: the front ends pass the bytes, the client address and the time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from doqproxy.dns import validate, wire
from doqproxy.dns.ede import Ede
from doqproxy.frontend.access import REFLECTION_PORTS, AccessList, client_address
from doqproxy.frontend.ratelimit import Decision, TokenBuckets, prefix_key

DROP = b""
"""Returned instead of a reply: send nothing."""

DEFAULT_LAN_RATELIMIT = 100.0
"""Queries a second per client prefix when the listener is reachable from a LAN (see README)."""

ANY_TTL = 3600
_ERROR_RCODES = frozenset(
    {wire.RCODE_FORMERR, wire.RCODE_SERVFAIL, wire.RCODE_NOTIMP, wire.RCODE_REFUSED}
)
_CLIENT_CACHE = 65536
ANY_QUESTION_TAIL = b"\x00\x00\xff\x00"
"""QTYPE ANY after a name's root label: a substring test that is cheap enough for
every datagram (a match is checked properly)."""
_U16 = struct.Struct("!H")


@dataclass(slots=True, frozen=True)
class AccessSettings:
    """The ``forward`` options about who is answered and how much."""

    allow: tuple[str, ...] = ()
    """CIDRs (or ``any``); empty means loopback plus the attached subnets."""
    refused_action: str = "drop"
    """``drop`` or ``refuse``: what a UDP client outside the access list gets."""
    ratelimit: float | None = None
    """Queries a second per prefix; ``None``: automatic, 0: off."""
    ratelimit_prefix_v4: int = 24
    ratelimit_prefix_v6: int = 56
    ratelimit_slip: int = 2
    ratelimit_errors: float | None = None
    """Error replies a second per prefix; ``None``: a fifth of ``ratelimit``."""
    refuse_any: bool = True
    ede_detail: str = "code"
    """``code``: EDE text for loopback clients only; ``full``: for everyone."""
    max_in_flight: int = 1024

    def effective_ratelimit(self, reaches_lan: bool) -> float:
        """The rate in force: 0 means off."""
        if self.ratelimit is not None:
            return self.ratelimit
        return DEFAULT_LAN_RATELIMIT if reaches_lan else 0.0


@dataclass(slots=True)
class AdmissionStats:
    """Counters for metrics: refusals by reason, rate-limit outcomes by action."""

    refused: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("acl", "snoop", "ratelimit", "reflection", "inflight_cap"), 0
        )
    )
    ratelimited: dict[str, int] = field(default_factory=lambda: {"drop": 0, "slip": 0})
    any_minimal: int = 0
    errors_limited: int = 0


@dataclass(slots=True, frozen=True)
class Client:
    """What the admission rules need to know about one client address."""

    allowed: bool
    loopback: bool
    key: tuple[int, int]


class Admission:
    """The per-query rules for one forwarder; :meth:`reconfigure` on SIGHUP."""

    def __init__(self, settings: AccessSettings, access: AccessList, *, reaches_lan: bool) -> None:
        self.stats = AdmissionStats()
        self.settings = settings
        self.access = access
        self.rate = 0.0
        self.buckets: TokenBuckets | None = None
        self.error_buckets: TokenBuckets | None = None
        self._clients: dict[str, Client] = {}
        self.trusted: dict[str, Client] = {}
        """Clients no per-client rule applies to (allowed, loopback, no rate limit): the
        UDP front end answers their cache hits after the reflection and ANY checks alone."""
        self._shape: tuple[float, float, int] | None = None
        self.reconfigure(settings, access, reaches_lan=reaches_lan)

    def reconfigure(
        self, settings: AccessSettings, access: AccessList, *, reaches_lan: bool
    ) -> None:
        self.settings = settings
        self.access = access
        self._clients = {}
        self.trusted = {}
        rate = settings.effective_ratelimit(reaches_lan)
        errors = settings.ratelimit_errors
        error_rate = errors if errors is not None else max(rate / 5, 1.0)
        shape = (rate, error_rate, settings.ratelimit_slip)
        if shape != self._shape:  # unchanged limits keep their buckets over a reload
            self._shape = shape
            self.buckets = TokenBuckets(rate, slip=settings.ratelimit_slip) if rate else None
            self.error_buckets = TokenBuckets(error_rate) if rate and error_rate else None
        self.rate = rate

    def client(self, host: str) -> Client:
        """Facts about ``host``, remembered (a bounded table) so the hot path is one lookup."""
        known = self._clients.get(host)
        if known is not None:
            return known
        try:
            address = client_address(host)
        except ValueError:
            return Client(False, False, (0, 0))
        settings = self.settings
        known = Client(
            self.access.allows(address),
            address.is_loopback,
            prefix_key(address, settings.ratelimit_prefix_v4, settings.ratelimit_prefix_v6),
        )
        if len(self._clients) >= _CLIENT_CACHE:
            self._clients.clear()
            self.trusted.clear()
        self._clients[host] = known
        if known.allowed and known.loopback and self.buckets is None:
            self.trusted[host] = known
        return known

    # --- queries ----------------------------------------------------------------

    def udp_query(self, data: bytes, host: str, port: int, now: float) -> bytes | None:
        """``None``: go on and answer; :data:`DROP`: send nothing; else the reply to send."""
        stats = self.stats
        if port in REFLECTION_PORTS:
            stats.refused["reflection"] += 1
            return DROP
        client = self.client(host)
        if not client.allowed:
            stats.refused["acl"] += 1
            if self.settings.refused_action != "refuse":
                return DROP
            return self.udp_reply(refused_reply(data), client, now)
        buckets = self.buckets
        if buckets is not None:
            decision = buckets.take(client.key, now)
            if decision is not Decision.PASS:
                stats.refused["ratelimit"] += 1
                if decision is Decision.SLIP:
                    stats.ratelimited["slip"] += 1
                    return slip_reply(data)
                stats.ratelimited["drop"] += 1
                return DROP
        if len(data) < wire.HEADER_LEN:
            return None
        flags = data[2]
        if not flags & 0x01 and not flags & 0x80 and not client.loopback:
            stats.refused["snoop"] += 1
            return self.udp_reply(refused_reply(data), client, now)
        # The root label, QTYPE 255 and a class below 256: a C-speed test that lets
        # all but ANY queries skip the question scan.
        if self.settings.refuse_any and ANY_QUESTION_TAIL in data:
            found = wire.scan_question(data)
            if found is not None and found[1] == wire.TYPE_ANY:
                reply = minimal_any_reply(data)
                if reply is not None:
                    stats.any_minimal += 1
                    return reply
        return None

    def tcp_query(self, data: bytes, client: Client) -> bytes | None:
        """Like :meth:`udp_query` for a message on an accepted TCP connection."""
        if not client.allowed:
            self.stats.refused["acl"] += 1
            return refused_reply(data) or DROP
        if len(data) >= wire.HEADER_LEN and not data[2] & 0x81 and not client.loopback:
            self.stats.refused["snoop"] += 1
            return refused_reply(data) or DROP
        return None

    def overloaded(self, data: bytes, in_flight: int) -> bytes | None:
        """SERVFAIL at once when ``in_flight`` is at ``--max-in-flight``, else ``None``."""
        if in_flight < self.settings.max_in_flight:
            return None
        self.stats.refused["inflight_cap"] += 1
        verdict = validate.classify(data)
        if isinstance(verdict, validate.Rejected):
            return verdict.reply or DROP
        return wire.error_reply(
            verdict, wire.RCODE_SERVFAIL, ede=(Ede.OTHER, "too many queries in flight")
        )

    # --- replies ----------------------------------------------------------------

    def udp_reply(self, reply: bytes, client: Client, now: float) -> bytes:
        """The reply to send a UDP client (maybe :data:`DROP`): error replies are rate-limited."""
        if len(reply) < 4:
            return reply
        rcode = reply[3] & 0x0F
        if rcode in _ERROR_RCODES:
            errors = self.error_buckets
            if errors is not None and errors.take(client.key, now) is not Decision.PASS:
                self.stats.errors_limited += 1
                self.stats.ratelimited["drop"] += 1
                return DROP
            if rcode == wire.RCODE_SERVFAIL:
                return self.ede_for(reply, client)
        return reply

    def ede_for(self, reply: bytes, client: Client) -> bytes:
        """``reply`` with the EDE EXTRA-TEXT removed unless the client may see it."""
        if client.loopback or self.settings.ede_detail == "full":
            return reply
        return strip_ede_text(reply)


def refused_reply(data: bytes) -> bytes:
    """REFUSED with the question echoed; header only if the question is unreadable;
    empty for something that is not a query at all."""
    if len(data) < wire.HEADER_LEN or data[2] & 0x80:
        return DROP
    try:
        question = wire.parse_question(data)
    except wire.WireError:
        return wire.header_only_reply(data, wire.RCODE_REFUSED)
    return wire.error_reply(question, wire.RCODE_REFUSED)


def slip_reply(data: bytes) -> bytes:
    """An empty TC=1 reply: a real client retries over TCP, a victim gets no amplification."""
    if len(data) < wire.HEADER_LEN or data[2] & 0x80:
        return DROP
    try:
        question = wire.parse_question(data)
    except wire.WireError:
        return DROP
    reply = wire.error_reply(question, wire.RCODE_NOERROR)
    return reply[:2] + bytes([reply[2] | (wire.FLAG_TC >> 8)]) + reply[3:]


def minimal_any_reply(data: bytes) -> bytes | None:
    """RFC 8482 §4.2: one synthesized HINFO "RFC8482" "" record; ``None`` when the
    query is not a valid one (the resolver then gives the right error)."""
    verdict = validate.classify(data)
    if isinstance(verdict, validate.Rejected):
        return None
    question = verdict
    opt = b""
    if question.edns is not None:
        opt = wire.encode_opt(1232, flags=question.edns.flags & wire.EDNS_DO)
    header = wire.response_header(question, wire.RCODE_NOERROR, counts=(1, 1, 0, 1 if opt else 0))
    rdata = b"\x07RFC8482\x00"
    # QCLASS ANY (255) or NONE (254) is for questions only: the record is class IN.
    rrclass = question.qclass if question.qclass < 254 else 1
    record = (
        b"\xc0\x0c"  # the owner is the question name
        + struct.pack("!HHIH", 13, rrclass, ANY_TTL, len(rdata))
        + rdata
    )
    tail = struct.pack("!HH", question.qtype, question.qclass)
    return header + question.qname + tail + record + opt


def strip_ede_text(reply: bytes) -> bytes:
    """Drop the EXTRA-TEXT of the EDE options in a reply shaped like ours (question
    and OPT only); anything else is returned unchanged."""
    if len(reply) < wire.HEADER_LEN or reply[4:11] != b"\x00\x01\x00\x00\x00\x00\x00":
        return reply
    if reply[11] != 1:
        return reply
    try:
        pos = wire.skip_name(reply, wire.HEADER_LEN) + 4
    except wire.WireError:
        return reply
    # OPT: root name (1), type, class = payload, ttl (4), rdlength (2), options.
    if len(reply) < pos + 11 or reply[pos] != 0 or reply[pos + 1 : pos + 3] != b"\x00\x29":
        return reply
    (rdlength,) = _U16.unpack_from(reply, pos + 9)
    start = pos + 11
    if start + rdlength != len(reply):
        return reply
    options = bytearray()
    changed = False
    i = start
    while i + 4 <= len(reply):
        code, length = struct.unpack_from("!HH", reply, i)
        value = reply[i + 4 : i + 4 + length]
        if code == wire.OPTION_EDE and length > 2:
            value, changed = value[:2], True
        options += _U16.pack(code) + _U16.pack(len(value)) + value
        i += 4 + length
    if not changed or i != len(reply):
        return reply
    return reply[: pos + 9] + _U16.pack(len(options)) + bytes(options)
