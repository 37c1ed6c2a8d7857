"""An :class:`~doqproxy.upstream.base.Upstream` that answers authoritatively from one zone file.

It is what ``doqproxy serve --zone`` puts behind the DoQ listener, so that the
listener can be used (and demonstrated, and tested) without any other server.

Answers follow RFC 1034 §4.3.2 in a small way:

- names in the zone get their records with AA set;
- a CNAME is followed while its target stays inside the zone (at most 8 links);
- a name that exists without the type asked for is NODATA, a name that does not
  exist is NXDOMAIN; both carry the SOA in the authority section, with the TTL
  RFC 2308 §3 asks for (the smaller of the SOA's TTL and its MINIMUM);
- a wildcard (``*.example``) stands in for names that do not exist below its parent
  (RFC 4592, without the corner cases of wildcards at delegations);
- names at or below a delegation get a referral (AA clear, NS in authority, glue);
- names outside the zone, or another class, are REFUSED.

There is no DNSSEC processing, no zone transfer (the resolver refuses AXFR/IXFR) and
no dynamic update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.upstream.base import UpstreamError

MAX_CNAME_CHAIN = 8
MAX_CACHED_ANSWERS = 10_000
_SHAPING_FLAGS = wire.OPCODE_MASK | wire.FLAG_RD | wire.FLAG_CD
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class ZoneError(Exception):
    """The zone file cannot be used; the message says why in one line."""


@dataclass(slots=True)
class _Lookup:
    """What the zone says about one name: records, a referral, or nothing."""

    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]
    additional: list[dns.rrset.RRset]
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    authoritative: bool = True


def load_zone(path: str | os.PathLike[str], origin: str | None = None) -> dns.zone.Zone:
    """Parse a master file (RFC 1035 §5) with absolute names, or raise :class:`ZoneError`."""
    try:
        return dns.zone.from_file(
            os.fspath(path),
            origin=origin,
            relativize=False,
            allow_include=False,
        )
    except FileNotFoundError:
        raise ZoneError(f"zone file {os.fspath(path)!r} does not exist") from None
    except OSError as exc:
        raise ZoneError(f"zone file {os.fspath(path)!r}: {exc.strerror}") from None
    except dns.zone.UnknownOrigin:
        raise ZoneError(
            f"zone file {os.fspath(path)!r} has no $ORIGIN; give one with --origin"
        ) from None
    except dns.zone.NoSOA:
        raise ZoneError(f"zone file {os.fspath(path)!r} has no SOA record at its origin") from None
    except dns.zone.NoNS:
        raise ZoneError(f"zone file {os.fspath(path)!r} has no NS records at its origin") from None
    except dns.exception.DNSException as exc:
        raise ZoneError(f"zone file {os.fspath(path)!r}: {exc}") from None


class ZoneBackend:
    """Answers queries for one zone with authority. Shaped like an ``Upstream``."""

    pad_block: int | None = None

    def __init__(self, zone: dns.zone.Zone) -> None:
        if zone.origin is None:
            raise ZoneError("zone has no origin")
        self.zone = zone
        self.origin: dns.name.Name = zone.origin
        self.name = f"zone:{self.origin.to_text()}"
        self.rdclass = zone.rdclass
        self._answers: dict[tuple[object, ...], bytes] = {}
        # Every name that exists, including empty non-terminals (RFC 8020): a name
        # with only descendants is NODATA, never NXDOMAIN.
        self._existing: set[dns.name.Name] = set()
        self._cuts: set[dns.name.Name] = set()
        for name, node in zone.nodes.items():
            owner = name.derelativize(self.origin)
            if owner != self.origin and node.get_rdataset(self.rdclass, dns.rdatatype.NS):
                self._cuts.add(owner)
            while owner.is_subdomain(self.origin) and owner not in self._existing:
                self._existing.add(owner)
                if owner == self.origin:
                    break
                owner = owner.parent()
        soa = zone.get_rdataset(self.origin, dns.rdatatype.SOA)
        if soa is None:
            raise ZoneError("zone has no SOA record at its origin")
        negative_ttl = min(soa.ttl, soa[0].minimum)
        self._soa = dns.rrset.from_rdata_list(self.origin, negative_ttl, list(soa))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], origin: str | None = None) -> ZoneBackend:
        """Load ``path`` and check it can be served."""
        return cls(load_zone(path, origin))

    async def query(self, message: bytes, question: Question) -> bytes:
        """Answer ``message`` (ID 0) from the zone.

        The zone never changes, so answers are kept by what shapes them. The resolver
        puts the client's spelling of the name and its OPT record back on each reply.
        """
        edns = question.edns
        key = (
            question.key,
            question.flags & _SHAPING_FLAGS,
            edns is not None,
            edns is not None and edns.do,
        )
        reply = self._answers.get(key)
        if reply is None:
            reply = self.answer(message)
            if len(self._answers) >= MAX_CACHED_ANSWERS:
                self._answers.clear()
            self._answers[key] = reply
        return reply

    async def aclose(self) -> None:
        """Nothing to release."""

    def answer(self, message: bytes) -> bytes:
        """The wire-format reply to a query, synchronously.

        Raises :class:`UpstreamError` (SERVFAIL with an EDE, no traceback) for a
        query dnspython cannot take and for an answer that cannot fit in one DNS
        message (65535 octets).
        """
        try:
            query = dns.message.from_wire(message)
        except dns.exception.DNSException as exc:  # validation should have caught it
            raise UpstreamError(f"zone cannot answer this query: {exc}", Ede.OTHER) from None
        try:
            return self._answer(query)
        except dns.exception.TooBig:
            raise UpstreamError(
                "the zone's answer is larger than a DNS message (65535 octets)", Ede.OTHER
            ) from None

    def _answer(self, query: dns.message.Message) -> bytes:
        response = dns.message.make_response(query, our_payload=1232)
        response.flags &= ~dns.flags.RA
        qrrset = query.question[0]
        if qrrset.rdclass != self.rdclass or not qrrset.name.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire(max_size=65535)
        found = self.lookup(qrrset.name, qrrset.rdtype)
        response.answer = found.answer
        response.authority = found.authority
        response.additional = found.additional
        response.set_rcode(found.rcode)
        if found.authoritative:
            response.flags |= dns.flags.AA
        return response.to_wire(max_size=65535)

    def lookup(self, qname: dns.name.Name, qtype: int) -> _Lookup:
        """Resolve ``qname``/``qtype`` inside the zone, following CNAMEs."""
        result = _Lookup([], [], [])
        name = qname
        for _ in range(MAX_CNAME_CHAIN + 1):
            cut = self._cut_at_or_above(name)
            if cut is not None and not (qtype == dns.rdatatype.DS and name == cut):
                if not result.answer:
                    result.authoritative = False
                self._referral(cut, result)
                return result
            rdatasets, owner_exists = self._records(name)
            if not owner_exists:
                if not result.answer:
                    result.rcode = dns.rcode.NXDOMAIN
                result.authority.append(self._soa)
                return result
            cname = rdatasets.get(dns.rdatatype.CNAME)
            if cname is not None and qtype not in (dns.rdatatype.CNAME, dns.rdatatype.ANY):
                result.answer.append(_rrset(name, cname))
                target = cname[0].target
                if not target.is_subdomain(self.origin):
                    return result
                name = target
                continue
            if qtype == dns.rdatatype.ANY and rdatasets:
                result.answer.extend(_rrset(name, rds) for rds in rdatasets.values())
                return result
            wanted = rdatasets.get(qtype)
            if wanted is None:
                result.authority.append(self._soa)
                return result
            result.answer.append(_rrset(name, wanted))
            if qtype in (dns.rdatatype.NS, dns.rdatatype.MX, dns.rdatatype.SRV):
                self._add_glue(wanted, result)
            return result
        # A chain longer than we follow: return what we have, as BIND does.
        return result

    def _records(self, name: dns.name.Name) -> tuple[dict[int, dns.rdataset.Rdataset], bool]:
        """The rdatasets at ``name`` (or synthesised from a wildcard) and whether it exists."""
        node = self.zone.get_node(name)
        if node is not None and node.rdatasets:
            return {rds.rdtype: rds for rds in node.rdatasets}, True
        if name in self._existing:
            return {}, True
        encloser = name.parent()
        while encloser not in self._existing:
            encloser = encloser.parent()
        wildcard = self.zone.get_node(dns.name.Name((b"*", *encloser.labels)))
        if wildcard is None or not wildcard.rdatasets:
            return {}, False
        return {rds.rdtype: rds for rds in wildcard.rdatasets}, True

    def _cut_at_or_above(self, name: dns.name.Name) -> dns.name.Name | None:
        """The highest delegation point at or above ``name``, if any."""
        found = None
        while name != self.origin and name.is_subdomain(self.origin):
            if name in self._cuts:
                found = name
            name = name.parent()
        return found

    def _referral(self, cut: dns.name.Name, result: _Lookup) -> None:
        ns = self.zone.get_rdataset(cut, dns.rdatatype.NS)
        assert ns is not None
        result.authority.append(_rrset(cut, ns))
        self._add_glue(ns, result)

    def _add_glue(self, rdataset: dns.rdataset.Rdataset, result: _Lookup) -> None:
        for rdata in rdataset:
            target = getattr(rdata, "target", None) or getattr(rdata, "exchange", None)
            if not isinstance(target, dns.name.Name) or not target.is_subdomain(self.origin):
                continue
            for rdtype in _ADDRESS_TYPES:
                addresses = self.zone.get_rdataset(target, rdtype)
                if addresses is not None:
                    result.additional.append(_rrset(target, addresses))


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))
