"""One cached answer, kept as wire bytes with the offsets needed to serve it fast.

An upstream answer is walked once, when it is stored (:func:`build_entry`). What
is kept is everything after the question section with the OPT record removed,
plus the offsets of every TTL field in it. Serving a hit is then byte
concatenation: the client's ID, the stored header with the client's RD bit, the
client's own question bytes (so 0x20 mixed case survives), the records with
their TTLs aged, and our OPT record if the client sent one.

The question is put back at offset 12 with the same length it had, so
compression pointers in the stored records still point at the right name.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from doqproxy.dns import rewrite, wire
from doqproxy.dns.wire import Edns, Question

STALE_TTL = 30
"""RFC 8767 §5: the TTL given to records served stale."""

ENTRY_OVERHEAD = 300
"""Approximate bytes one entry costs beyond its wire payload: the entry object, its
key, its stored-at time and the store's dict slot. With tracemalloc on CPython 3.11,
100,000 single-A entries took 302 bytes each in all; used by the cache's byte bound."""

_TYPE_CNAME = 5
_TTL = struct.Struct("!I")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")
_MAX_TTL = 0x7FFFFFFF
_EDE_STALE = struct.pack("!HHH", wire.OPTION_EDE, 2, 3)
_NO_EDNS = Edns(payload=0, ext_rcode=0, version=0, flags=0, options=(), start=0, end=0)
_TtlFn = Callable[[int], int]
_SHARED: dict[bytes, bytes] = {}
"""Interned copies of the few distinct short byte strings (OPT records, headers)
that most entries have in common."""


_HEAD_EDNS: dict[bytes, bytes] = {}
"""Header octets with ARCOUNT + 1, by the header without OPT."""
_SHARED_TUPLES: dict[tuple[int, ...], tuple[int, ...]] = {}
_SHARED_INTS: dict[int, int] = {}


def _shared(value: bytes) -> bytes:
    if len(value) > 16:
        return value
    return _SHARED.setdefault(value, value)


def _shared_offsets(offsets: list[int]) -> tuple[int, ...]:
    """Most answers have one of a few TTL-offset layouts: keep one copy of each."""
    value = tuple(offsets)
    if len(value) > 4 or len(_SHARED_TUPLES) > 4096:
        return value
    return _SHARED_TUPLES.setdefault(value, value)


def _shared_int(value: int) -> int:
    if len(_SHARED_INTS) > 4096:
        return value
    return _SHARED_INTS.setdefault(value, value)


class Uncacheable(ValueError):
    """The answer must not be cached; the message says why."""


@dataclass(slots=True, frozen=True)
class TtlPolicy:
    """The TTL bounds applied when an answer is stored."""

    min_ttl: int = 0
    max_ttl: int = 86400
    max_negative_ttl: int = 3600


class CacheEntry:
    """A stored answer, ready to be served to any client asking the same question."""

    __slots__ = (
        "head",
        "nx_by_name",
        "opt",
        "referenced",
        "refreshing",
        "rendered",
        "rendered_age",
        "retry_at",
        "stored_at",
        "template",
        "ttl",
        "ttl_offsets",
    )

    def __init__(
        self,
        *,
        head: bytes,
        template: bytes,
        ttl_offsets: tuple[int, ...],
        opt: bytes,
        ttl: int,
        stored_at: float,
        nx_by_name: bool,
    ) -> None:
        self.head = head
        """Header octets 2-11 (flags and counts) without OPT in ARCOUNT."""
        self.template = template
        """The records after the question, OPT removed, TTLs as served at age 0."""
        self.ttl_offsets = ttl_offsets
        """Offsets of the TTL fields in :attr:`template`."""
        self.opt = opt
        """The OPT record for clients that sent one (our payload size)."""
        self.ttl = ttl
        """Seconds the entry is fresh."""
        self.stored_at = stored_at
        self.nx_by_name = nx_by_name
        """NXDOMAIN: the entry answers every QTYPE for the name."""
        self.rendered = template
        """:attr:`template` aged by :attr:`rendered_age` whole seconds."""
        self.rendered_age = 0
        self.refreshing = False
        """A background refresh is under way; no further one is started."""
        self.referenced = False
        """Hit since the store's evictor last passed (CLOCK eviction)."""
        self.retry_at = 0.0
        """Serving stale after an upstream failure: don't ask upstream again before this."""

    @property
    def size(self) -> int:
        """Estimated memory cost in bytes, for the cache's byte bound: the
        template, an aged copy of it, the OPT record, and :data:`ENTRY_OVERHEAD`."""
        return ENTRY_OVERHEAD + 2 * len(self.template) + len(self.opt)

    def body(self, age: int) -> bytes:
        """The records with TTLs decremented by ``age`` seconds (re-rendered once per second)."""
        if age != self.rendered_age:
            self.rendered = self._with_ttls(lambda ttl: ttl - age if ttl > age else 0)
            self.rendered_age = age
        return self.rendered

    @property
    def head_edns(self) -> bytes:
        """:attr:`head` with OPT counted in ARCOUNT (one shared copy per distinct head)."""
        head = self.head
        edns = _HEAD_EDNS.get(head)
        if edns is None:
            edns = head[:8] + _U16.pack(((head[8] << 8) | head[9]) + 1)
            if len(_HEAD_EDNS) < 4096:
                _HEAD_EDNS[head] = edns
        return edns

    def stale(self) -> bytes:
        """The records with every TTL set to :data:`STALE_TTL` (a rare path: not kept)."""
        return self._with_ttls(lambda ttl: STALE_TTL)

    def _with_ttls(self, fn: _TtlFn) -> bytes:
        out = bytearray(self.template)
        template = self.template
        for offset in self.ttl_offsets:
            _TTL.pack_into(out, offset, fn(_TTL.unpack_from(template, offset)[0]))
        return bytes(out)

    def compose(
        self,
        query_id: bytes,
        rd: int,
        question: bytes,
        *,
        edns: bool,
        limit: int,
        body: bytes,
        ede_stale: bool = False,
    ) -> bytes:
        """The reply for a client: its ID (2 octets), RD bit (0 or 1) and question bytes.

        ``limit`` is the largest reply the transport takes (the client's UDP limit);
        a longer one becomes header, question and OPT with TC=1.
        """
        head = self.head
        opt = b""
        if edns:
            head = self.head_edns
            opt = self.opt
            if ede_stale:
                opt = opt[:9] + _U16.pack(len(opt) - 11 + len(_EDE_STALE)) + opt[11:] + _EDE_STALE
        if (head[0] ^ rd) & 1:
            head = bytes((head[0] ^ 1,)) + head[1:]
        if 12 + len(question) + len(body) + len(opt) > limit:
            # RFC 2181 §9: header, question and OPT only, with TC set.
            flags = bytes((head[0] | (wire.FLAG_TC >> 8), head[1]))
            counts = b"\x00\x01\x00\x00\x00\x00" + (b"\x00\x01" if opt else b"\x00\x00")
            return query_id + flags + counts + question + opt
        return b"".join((query_id, head, question, body, opt))


def build_entry(
    response: bytes,
    parsed: Question,
    *,
    now: float,
    policy: TtlPolicy,
    payload: int = rewrite.OUR_UDP_PAYLOAD,
) -> CacheEntry:
    """Walk a checked upstream answer once and build its entry.

    ``parsed`` is :func:`doqproxy.dns.rewrite.check_response` of ``response``. Raises
    :class:`Uncacheable` for answers that RFC 2308 or common sense say not to keep.
    """
    flags = parsed.flags
    rcode = flags & wire.RCODE_MASK
    edns = parsed.edns
    if flags & wire.FLAG_TC:
        raise Uncacheable("truncated")
    if (flags & wire.OPCODE_MASK) or rcode not in (wire.RCODE_NOERROR, wire.RCODE_NXDOMAIN):
        raise Uncacheable(f"opcode {parsed.opcode}, rcode {rcode}")
    if edns is not None and edns.ext_rcode:
        raise Uncacheable("extended rcode")
    if parsed.question_end != wire.HEADER_LEN + len(parsed.qname) + 4:
        raise Uncacheable("compressed question name")
    end = len(response)
    if edns is not None:
        if edns.end != end:
            raise Uncacheable("OPT is not the last record")
        end = edns.start
    _, an, ns, ar = parsed.counts
    records = an + ns + ar - (edns is not None)
    start = parsed.question_end
    ttl_offsets, ttls, soa, answer_types = _walk(response, start, records, an, ns)

    # Negative (RFC 2308): NXDOMAIN, NOERROR with no answer, or NOERROR with an SOA
    # and no record of the type asked for (NODATA after a CNAME chain). A CNAME
    # chain without an SOA is a positive answer as far as it goes.
    qtype = parsed.qtype
    answered = qtype in answer_types or qtype in (wire.TYPE_ANY, _TYPE_CNAME)
    negative = rcode == wire.RCODE_NXDOMAIN or an == 0 or (not answered and soa is not None)
    if negative:
        if soa is None:
            raise Uncacheable("negative answer without SOA")
        limit = min(soa[0], soa[1], policy.max_negative_ttl)
        served = [min(t, limit) for t in ttls]
    else:
        served = [min(max(t, policy.min_ttl), policy.max_ttl) for t in ttls]
    # The entry lives as long as its shortest record (a short CNAME before an
    # NXDOMAIN must not be served at TTL 0 for the rest of the negative TTL).
    ttl = min(served)
    if ttl <= 0:
        raise Uncacheable("TTL 0")

    template = bytearray(response[start:end])
    for offset, value in zip(ttl_offsets, served, strict=True):
        _TTL.pack_into(template, offset, value)
    head = response[2:10] + _U16.pack(ar - (edns is not None))
    return CacheEntry(
        head=_shared(head),
        template=bytes(template),
        ttl_offsets=_shared_offsets(ttl_offsets),
        opt=_shared(rewrite.response_opt(_NO_EDNS, edns, payload) or b""),
        ttl=_shared_int(ttl),
        stored_at=now,
        nx_by_name=rcode == wire.RCODE_NXDOMAIN and an == 0,
    )


def _walk(
    data: bytes, start: int, records: int, an: int, ns: int
) -> tuple[list[int], list[int], tuple[int, int] | None, set[int]]:
    """TTL offsets (relative to ``start``) and TTLs of ``records`` records, the
    (TTL, MINIMUM) of the first SOA in the authority section, and the types found in
    the answer section."""
    offsets: list[int] = []
    ttls: list[int] = []
    soa: tuple[int, int] | None = None
    answer_types: set[int] = set()
    pos = start
    for index in range(records):
        pos = wire.skip_name(data, pos)
        rtype, _, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
        if rtype == wire.TYPE_OPT:
            raise Uncacheable("OPT record before the end")
        if ttl > _MAX_TTL:
            ttl = 0  # RFC 2181 §8
        offsets.append(pos + 4 - start)
        ttls.append(ttl)
        if index < an:
            answer_types.add(rtype)
        pos += 10
        if soa is None and rtype == wire.TYPE_SOA and an <= index < an + ns and rdlen >= 22:
            soa = (ttl, min(_TTL.unpack_from(data, pos + rdlen - 4)[0], _MAX_TTL))
        pos += rdlen
    return offsets, ttls, soa, answer_types


def question_bytes(question: Question) -> bytes:
    """The client's question section as it sent it."""
    return question.qname + struct.pack("!HH", question.qtype, question.qclass)
