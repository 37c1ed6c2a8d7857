"""Per-query observation for metrics and the query log, off the hot path unless asked for.

Nothing here is installed unless ``--metrics-listen`` or ``--query-log`` is
given; then :class:`ObservedResolver` sits between the front ends and the
:class:`~doqproxy.resolver.Resolver` and :class:`TimedUpstream` between the
resolver and the upstream. Metrics that the resolver, cache and pool already
count are read from their stats at scrape time instead (:mod:`doqproxy.ops.metrics`).
"""

from __future__ import annotations

import bisect
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import dns.rcode
import dns.rdatatype

from doqproxy.dns import wire
from doqproxy.dns.wire import Question
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.group import answered_by

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds, in seconds, of the upstream latency histogram (plus +Inf)."""

_EDE_STALE = b"\x00\x0f\x00\x02\x00\x03"
"""EDE option 15, length 2, INFO-CODE 3 (Stale Answer): the cache appends it last."""


@dataclass(slots=True)
class LatencyHistogram:
    """A Prometheus-style histogram kept as plain integers."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    errors: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with ``+Inf``."""
        running = 0
        out = []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class TimedUpstream:
    """Wraps an :class:`~doqproxy.upstream.base.Upstream` and times each query into a histogram."""

    def __init__(self, inner: Upstream, histogram: LatencyHistogram) -> None:
        self.inner = inner
        self.histogram = histogram
        self.name = inner.name
        self.pad_block = inner.pad_block

    async def query(self, message: bytes, question: Question) -> bytes:
        started = time.monotonic()
        try:
            answer = await self.inner.query(message, question)
        except Exception:
            self.histogram.errors += 1
            raise
        self.histogram.observe(time.monotonic() - started)
        return answer

    async def aclose(self) -> None:
        await self.inner.aclose()


def parse_question(data: bytes) -> tuple[str, str] | None:
    """(qname, qtype) as text from a raw query, or ``None`` if it has no sane question."""
    found = wire.scan_question(data)
    if found is None or data[5] == 0:
        return None
    name_end, qtype = found
    return wire.name_text(data[12:name_end]), _qtype_text(qtype)


_QTYPES: dict[int, str] = {}


def _qtype_text(qtype: int) -> str:
    text = _QTYPES.get(qtype)
    if text is None:
        text = dns.rdatatype.to_text(qtype)  # type: ignore[arg-type]
        if len(_QTYPES) < 1024:
            _QTYPES[qtype] = text
    return text


def raw_qtype(data: bytes) -> int:
    """The QTYPE of a raw query, or -1; no decoding, for the per-query counters."""
    found = wire.scan_question(data)
    return -1 if found is None else found[1]


_LABELLED_QTYPES = frozenset(
    {1, 2, 5, 6, 12, 15, 16, 28, 33, 35, 39, 43, 46, 47, 48, 50, 52, 64, 65, 99, 255, 251, 252, 257}
)
"""A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, NAPTR, DNAME, DS, RRSIG, NSEC, DNSKEY, NSEC3,
TLSA, SVCB, HTTPS, SPF, ANY, IXFR, AXFR, CAA: the ``qtype`` label takes these, "other" or "NONE"."""


_OTHER_QTYPE = 65536


def qtype_label(qtype: int) -> str:
    """A fixed set of labels, so clients cannot create 65,536 time series."""
    if qtype < 0:
        return "NONE"
    return _qtype_text(qtype) if qtype in _LABELLED_QTYPES else "other"


def rcode_label(rcode: int) -> str:
    return "DROPPED" if rcode < 0 else dns.rcode.to_text(rcode)  # type: ignore[arg-type]


def rcode_text(reply: bytes | None) -> str:
    if reply is None or len(reply) < 4:
        return "DROPPED"
    return dns.rcode.to_text(reply[3] & 0x0F)  # type: ignore[arg-type]


class QueryLog:
    """JSON lines, one per answered query, to a file (appended) or ``-`` for stdout.

    Lines are buffered and written out at least every :data:`FLUSH_INTERVAL`
    seconds (and at close), so logging costs no system call per query.
    """

    FLUSH_INTERVAL = 1.0

    def __init__(self, target: str) -> None:
        self.target = target
        self._stream: IO[str] = self._open()
        self._flush_at = 0.0

    def _open(self) -> IO[str]:
        if self.target == "-":
            return sys.stdout
        # 0640: the log holds client addresses and the names they asked for.
        fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return open(fd, "a", buffering=65536, encoding="utf-8")

    def reopen(self) -> None:
        """For log rotation (SIGHUP): close and open the path again."""
        if self.target != "-":
            try:
                fresh = self._open()
            except OSError as exc:  # keep writing where we were; the reload goes on
                log.warning("cannot reopen the query log %s: %s", self.target, exc)
                return
            old, self._stream = self._stream, fresh
            old.close()

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            now = time.monotonic()
            if now >= self._flush_at:
                self._flush_at = now + self.FLUSH_INTERVAL
                self._stream.flush()
        except (OSError, ValueError) as exc:
            log.warning("query log %s: %s", self.target, exc)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            log.warning("query log %s: %s", self.target, exc)

    def close(self) -> None:
        self.flush()
        if self.target != "-":
            self._stream.close()


@dataclass(slots=True)
class Observations:
    """What :class:`ObservedResolver` counts: answers by (udp?, QTYPE, RCODE or -1 for
    no answer), as raw integers; :mod:`doqproxy.ops.metrics` names them at scrape time."""

    answers: dict[tuple[bool, int, int], int] = field(default_factory=dict)
    query_log: QueryLog | None = None
    count: bool = True


class ObservedResolver:
    """Looks like a :class:`~doqproxy.resolver.Resolver` to the front ends and records
    each query's outcome before returning it.

    Cache status: ``hit`` is a fast-path cache hit, ``stale`` an answer carrying
    EDE 3 (only visible when the client used EDNS), ``miss`` anything else the
    cache did not answer up front; ``null`` when there is no cache. ``upstream``
    is the upstream whose answer was used (the group's name when this query
    joined another one's fetch).
    """

    def __init__(self, resolver: Resolver, observations: Observations) -> None:
        self.resolver = resolver
        self.observations = observations

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolver, name)

    def cached_reply(self, data: bytes, *, udp: bool, client: Any = None) -> bytes | None:
        reply = self.resolver.cached_reply(data, udp=udp)
        if reply is not None:
            self._record(data, reply, udp, "hit", time.monotonic(), client)
        return reply

    async def resolve(
        self, data: bytes, *, udp: bool, client: Any = None, cache_checked: bool = False
    ) -> bytes | None:
        started = time.monotonic()
        if not cache_checked:
            reply = self.resolver.cached_reply(data, udp=udp)
            if reply is not None:
                self._record(data, reply, udp, "hit", started, client)
                return reply
        slot: list[str] = []
        token = answered_by.set(slot)
        try:
            reply = await self.resolver.resolve(data, udp=udp, cache_checked=True)
        finally:
            answered_by.reset(token)
        status: str | None = None
        if self.resolver.cache is not None:
            status = "stale" if reply is not None and reply.endswith(_EDE_STALE) else "miss"
        self._record(data, reply, udp, status, started, client, slot[-1] if slot else None)
        return reply

    def _record(
        self,
        data: bytes,
        reply: bytes | None,
        udp: bool,
        cache: str | None,
        started: float,
        client: Any,
        answered: str | None = None,
    ) -> None:
        observations = self.observations
        if observations.count:
            qcode = raw_qtype(data)
            if qcode >= 0 and qcode not in _LABELLED_QTYPES:
                qcode = _OTHER_QTYPE  # keeps the table as small as the label set
            key = (udp, qcode, reply[3] & 0x0F if reply and len(reply) > 3 else -1)
            answers = observations.answers
            answers[key] = answers.get(key, 0) + 1
        query_log = observations.query_log
        if query_log is None:
            return
        question = parse_question(data)
        qname, qtype = question if question is not None else (None, "NONE")
        transport = "udp" if udp else "tcp"
        rcode = rcode_text(reply)
        now = datetime.datetime.now(datetime.UTC)
        query_log.write(
            {
                "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "client": _client_text(client),
                "transport": transport,
                "qname": qname,
                "qtype": qtype,
                "rcode": rcode,
                "cache": cache,
                "upstream": None if cache == "hit" else answered or self.resolver.upstream.name,
                "latency_ms": round((time.monotonic() - started) * 1000, 3),
            }
        )


def _client_text(client: Any) -> str | None:
    if isinstance(client, tuple) and len(client) >= 2:
        host, port = client[0], client[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None if client is None else str(client)
