"""The answer cache: policy and storage, no I/O.

Entries live in an :class:`~doqproxy.cache.store.EntryStore` bounded by entry
count and by total bytes (each entry's estimated memory cost). An entry stays in
the store past its TTL for ``serve_stale_max_age`` so that it can be served stale
(RFC 8767); whether it is fresh is decided here, from its own TTL.

Keys are bytes: the lowercased question name in wire form, then either QTYPE and
QCLASS (an ordinary entry) or QCLASS alone (an NXDOMAIN, which answers every
QTYPE for the name, RFC 2308 §5), then one octet holding the DO and CD bits.
The name is self-delimiting, so the two kinds of key never collide.

:meth:`AnswerCache.fast_reply` serves the common query shape straight from the
raw bytes: it never builds a :class:`~doqproxy.dns.wire.Question`. Anything unusual
goes the long way, through validation and :meth:`AnswerCache.lookup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from doqproxy.cache.entry import CacheEntry, TtlPolicy, Uncacheable, build_entry, question_bytes
from doqproxy.cache.store import EntryStore, TooLarge
from doqproxy.dns import wire
from doqproxy.dns.wire import Question

log = logging.getLogger(__name__)

Clock = Callable[[], float]
PrefetchHook = Callable[[bytes, Question], "asyncio.Future[Any] | None"]
"""Called with the client's query and its parsed question when a hit wants a refresh;
returns the refresh under way, if any."""

_NOT_ANSWERABLE = frozenset({wire.TYPE_OPT, *range(128, 253)})
"""Meta QTYPEs, TSIG, TKEY, IXFR and AXFR: the long way refuses them (validate.py)."""
_FLAG_OCTETS = (b"\x00", b"\x01", b"\x02", b"\x03")
"""Key suffix by ``do << 1 | cd``."""
_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_EDNS_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_OPT_TYPE = b"\x00\x29"
_NO_LIMIT = wire.MAX_MESSAGE


@dataclass(slots=True, frozen=True)
class CacheSettings:
    """Everything the cache can be told on the command line."""

    enabled: bool = True
    max_entries: int = 200_000
    """``--cache-size``: most entries kept."""
    max_bytes: int = 64 * 1024 * 1024
    """``--cache-max-bytes``: most bytes kept, by each entry's estimated memory cost."""
    min_ttl: int = 0
    max_ttl: int = 86400
    max_negative_ttl: int = 3600
    serve_stale: bool = True
    serve_stale_max_age: int = 86400
    """How long past its TTL an entry may still be served stale."""
    stale_answer_timeout: float = 1.8
    """RFC 8767 client response timer: answer stale when the upstream takes longer."""
    stale_retry: float = 30.0
    """RFC 8767 failure recheck timer: after a failed refresh, serve stale without
    asking the upstream again for this long."""
    prefetch_fraction: float = 0.1
    """A hit in this last fraction of an entry's TTL starts a background refresh."""

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("cache size and byte bound must be positive")
        if not 0 <= self.min_ttl <= self.max_ttl:
            raise ValueError("need 0 <= cache-min-ttl <= cache-max-ttl")
        if self.max_negative_ttl < 0 or self.serve_stale_max_age < 0:
            raise ValueError("TTL bounds must not be negative")


@dataclass(slots=True)
class CacheStats:
    """Counters kept for logs and metrics."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    prefetches: int = 0
    stored: int = 0
    not_stored: dict[str, int] = field(default_factory=dict)


class AnswerCache:
    """Stored answers keyed by question, served as wire bytes."""

    def __init__(
        self,
        settings: CacheSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        max_udp: int = wire.DEFAULT_MAX_UDP,
    ) -> None:
        self.clock = clock
        self.max_udp = max_udp
        """The largest UDP reply served and the payload size advertised (``--max-udp-size``)."""
        self.stats = CacheStats()
        self.prefetch_hook: PrefetchHook | None = None
        self._apply(settings or CacheSettings())
        self._store = self._new_store()

    def _apply(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._policy = TtlPolicy(settings.min_ttl, settings.max_ttl, settings.max_negative_ttl)
        self._keep = settings.serve_stale_max_age if settings.serve_stale else 0
        self._prefetch_at = 1.0 - settings.prefetch_fraction

    def _new_store(self) -> EntryStore:
        settings = self.settings
        return EntryStore(settings.max_entries, settings.max_bytes, self._keep)

    def reconfigure(self, settings: CacheSettings) -> None:
        """Apply new limits (SIGHUP), keeping the entries that still fit.

        TTL bounds apply to answers stored from now on.
        """
        self._apply(settings)
        old, self._store = self._store, self._new_store()
        now = self.clock()
        for key, entry in old.items():
            with contextlib.suppress(TooLarge):
                self._store.put(key, entry, now)

    def __len__(self) -> int:
        return len(self._store)

    @property
    def currsize(self) -> int:
        """Estimated bytes held."""
        return self._store.currsize

    # --- the hit path ----------------------------------------------------------

    def fast_reply(self, data: bytes, udp: bool) -> bytes | None:
        """The reply to a query of the common shape with a fresh entry, else ``None``.

        The common shape is QR=0, opcode QUERY, one question with an uncompressed
        name, no answer or authority records, and either nothing after the question
        or exactly one EDNS version 0 OPT record. Every query in that shape that
        has a fresh entry is one that validation would accept.
        """
        size = len(data)
        if size < 17 or data[2] & 0xF8:
            return None
        counts = data[4:12]
        if counts == _PLAIN_COUNTS:
            edns = False
        elif counts == _EDNS_COUNTS:
            edns = True
        else:
            return None
        pos = 12
        while True:
            length = data[pos]
            if not length:
                break
            if length > 63:
                return None
            pos += length + 1
            if pos >= size:
                return None
        name_end = pos + 1
        end = name_end + 4
        if end - 12 > 259:
            return None
        do = 0
        limit = _NO_LIMIT
        if edns:
            # OPT: root owner, TYPE 41, CLASS = payload, TTL = rcode|version|flags, RDLEN.
            if size < end + 11 or data[end] or data[end + 1 : end + 3] != _OPT_TYPE:
                return None
            if data[end + 6]:
                return None  # EDNS version other than 0: BADVERS, the long way
            opt_pos = end + 11
            if ((data[end + 9] << 8) | data[end + 10]) != size - opt_pos:
                return None
            while opt_pos < size:  # the options must be well formed too
                if opt_pos + 4 > size:
                    return None
                opt_pos += 4 + ((data[opt_pos + 2] << 8) | data[opt_pos + 3])
            if opt_pos != size:
                return None
            do = data[end + 7] >> 7
            if udp:
                limit = max((data[end + 3] << 8) | data[end + 4], wire.MIN_UDP_PAYLOAD)
                if limit > self.max_udp:
                    limit = self.max_udp
        elif end != size:
            return None
        elif udp:
            limit = wire.MIN_UDP_PAYLOAD
        flags = data[3]
        key = (
            data[12:name_end].lower()
            + data[name_end:end]
            + _FLAG_OCTETS[do << 1 | (flags >> 4) & 1]
        )
        store = self._store
        now = self.clock()
        entry = store.get(key, now)
        if entry is None:
            qtype = (data[name_end] << 8) | data[name_end + 1]
            if qtype in _NOT_ANSWERABLE:
                return None  # validation rejects these; a cached NXDOMAIN must not answer
            entry = store.get(key[: name_end - 12] + key[-3:], now)
            if entry is None:
                return None
        age = now - entry.stored_at
        if age >= entry.ttl:
            return None  # stale: the long way decides
        if age >= entry.ttl * self._prefetch_at and not entry.refreshing:
            self._prefetch(entry, data, None)
        self.stats.hits += 1
        sec = int(age)
        body = entry.rendered if entry.rendered_age == sec else entry.body(sec)
        if edns:
            head, opt = entry.head_edns, entry.opt
        else:
            head, opt = entry.head, b""
        if (head[0] ^ data[2]) & 1 or end + len(body) + len(opt) > limit:
            # RD differs from the stored answer's, or the reply must be truncated.
            return entry.compose(
                data[:2], data[2] & 1, data[12:end], edns=edns, limit=limit, body=body
            )
        return b"".join((data[:2], head, data[12:end], body, opt))

    # --- the long way ----------------------------------------------------------

    @staticmethod
    def key(question: Question) -> bytes:
        """The key of an ordinary entry for ``question``."""
        do = 1 if question.edns is not None and question.edns.do else 0
        cd = 1 if question.flags & wire.FLAG_CD else 0
        qtail = struct.pack("!HH", question.qtype, question.qclass)
        return question.qname.lower() + qtail + _FLAG_OCTETS[do << 1 | cd]

    def lookup(self, question: Question) -> CacheEntry | None:
        """The entry for ``question``, fresh or stale, or ``None``."""
        key = self.key(question)
        now = self.clock()
        entry = self._store.get(key, now)
        if entry is None:
            entry = self._store.get(key[: len(question.qname)] + key[-3:], now)
        if entry is None:
            self.stats.misses += 1
        return entry

    def is_fresh(self, entry: CacheEntry) -> bool:
        return self.clock() - entry.stored_at < entry.ttl

    def reply(self, entry: CacheEntry, data: bytes, question: Question, *, udp: bool) -> bytes:
        """Serve a fresh ``entry`` to ``question``; may start a prefetch."""
        age = self.clock() - entry.stored_at
        if age >= entry.ttl * self._prefetch_at and not entry.refreshing:
            self._prefetch(entry, data, question)
        self.stats.hits += 1
        return entry.compose(
            data[:2],
            (question.flags & wire.FLAG_RD) >> 8,
            question_bytes(question),
            edns=question.edns is not None,
            limit=wire.udp_payload_limit(question, self.max_udp) if udp else _NO_LIMIT,
            body=entry.body(int(age)),
        )

    def stale_reply(self, entry: CacheEntry, question: Question, *, udp: bool) -> bytes:
        """Serve an expired ``entry``: TTLs of 30 s and EDE 3 (Stale Answer)."""
        self.stats.stale += 1
        return entry.compose(
            struct.pack("!H", question.id),
            (question.flags & wire.FLAG_RD) >> 8,
            question_bytes(question),
            edns=question.edns is not None,
            limit=wire.udp_payload_limit(question, self.max_udp) if udp else _NO_LIMIT,
            body=entry.stale(),
            ede_stale=True,
        )

    def may_serve_stale(self, entry: CacheEntry, question: Question) -> bool:
        """RFC 8767: only with serve-stale on, within the stale window, and never for RD=0."""
        return (
            self.settings.serve_stale
            and bool(question.flags & wire.FLAG_RD)
            and self.clock() - entry.stored_at < entry.ttl + self._keep
        )

    def hold_stale(self, entry: CacheEntry) -> None:
        """A refresh failed: serve ``entry`` stale without retrying for a while."""
        entry.retry_at = self.clock() + self.settings.stale_retry

    def holding(self, entry: CacheEntry) -> bool:
        return self.clock() < entry.retry_at

    def _prefetch(self, entry: CacheEntry, data: bytes, question: Question | None) -> None:
        hook = self.prefetch_hook
        if hook is None:
            return
        if question is None:
            try:
                question = wire.parse_question(data)
            except wire.WireError:
                return
        if not question.flags & wire.FLAG_RD:
            return  # an RD=0 answer is not stored, so it could not refresh anything
        entry.refreshing = True
        self.stats.prefetches += 1
        refresh = hook(data, question)
        if refresh is not None:
            # Whatever came of it (stored, failed, not cacheable), a later hit may try again.
            refresh.add_done_callback(lambda _: setattr(entry, "refreshing", False))

    # --- storing ---------------------------------------------------------------

    def store(self, question: Question, response: bytes, parsed: Question) -> bool:
        """Keep a checked upstream answer to ``question`` if it may be cached.

        Answers to RD=0 queries are not stored: they are whatever the upstream
        happened to hold, and must not be served to clients that want recursion.
        """
        if not question.flags & wire.FLAG_RD:
            return self._not_stored("RD=0 query")
        try:
            entry = build_entry(
                response, parsed, now=self.clock(), policy=self._policy, payload=self.max_udp
            )
        except Uncacheable as exc:
            return self._not_stored(str(exc))
        except (wire.WireError, struct.error) as exc:
            return self._not_stored(f"malformed: {exc}")
        key = self.key(question)
        name_key = key[: len(question.qname)] + key[-3:]
        store = self._store
        if entry.nx_by_name:
            key = name_key
        else:
            store.pop(name_key)  # the name exists after all
        try:
            store.put(key, entry, entry.stored_at)
        except TooLarge:
            return self._not_stored("larger than the cache")
        self.stats.stored += 1
        return True

    def _not_stored(self, reason: str) -> bool:
        counts = self.stats.not_stored
        counts[reason] = counts.get(reason, 0) + 1
        log.debug("answer not cached: %s", reason)
        return False

    def drop_names(self, predicate: Callable[[bytes], bool]) -> int:
        """Drop every entry whose name (lower-case wire form) ``predicate`` accepts,
        e.g. the names of a route that changed on reload. Returns how many."""
        doomed = [key for key, _ in self._store.items() if predicate(_key_name(key))]
        for key in doomed:
            self._store.pop(key)
        return len(doomed)

    def clear(self) -> None:
        self._store.clear()


def make_cache(
    settings: CacheSettings,
    *,
    clock: Clock = time.monotonic,
    max_udp: int = wire.DEFAULT_MAX_UDP,
) -> AnswerCache | None:
    """An :class:`AnswerCache`, or ``None`` when caching is turned off."""
    return AnswerCache(settings, clock=clock, max_udp=max_udp) if settings.enabled else None


def _key_name(key: bytes) -> bytes:
    """The name at the start of a cache key (uncompressed wire form)."""
    pos = 0
    while key[pos]:
        pos += 1 + key[pos]
    return key[: pos + 1]
