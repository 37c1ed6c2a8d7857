"""The one request pipeline that every front end (UDP, TCP, DoQ) hands queries to.

validate → local zones → cache → coalesce → upstream → cache → reply. Each step is a pure
function from :mod:`doqproxy.dns.validate`, :mod:`doqproxy.cache.policy` or
:mod:`doqproxy.dns.rewrite`; this module only sequences them, applies the deadline
and turns failures into SERVFAIL with an Extended DNS Error saying why, or into
a stale answer when serve-stale (RFC 8767) allows one.

A cache hit of the common shape skips validation: :meth:`AnswerCache.fast_reply`
only answers queries that validation would accept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from doqproxy.cache.policy import AnswerCache
from doqproxy.coalesce import Coalescer
from doqproxy.deadlines import Deadlines
from doqproxy.dns import rewrite, validate, wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.routing.local_zones import LocalZones
from doqproxy.upstream import answered
from doqproxy.upstream.base import Upstream, UpstreamError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ResolverStats:
    """Counters kept for logs and metrics."""

    queries: int = 0
    dropped: int = 0
    rejected: int = 0
    local: int = 0
    """Answered from a locally served zone (never sent upstream)."""
    upstream_errors: int = 0
    rcodes: dict[int, int] = field(default_factory=dict)
    servfails: dict[int | None, int] = field(default_factory=dict)
    """SERVFAILs by the EDE INFO-CODE doqproxy attached; ``None``: the upstream's own."""


@dataclass(slots=True)  # not frozen: one per cache miss, and frozen init is slow
class Answer:
    """A checked upstream answer."""

    response: bytes
    parsed: Question


@dataclass(slots=True, frozen=True)
class Failure:
    """No usable answer came back."""

    reason: str
    ede: Ede


Outcome = Answer | Failure


class FailureLog:
    """SERVFAIL log lines without the flood: one line per (name, EDE code) every
    ``interval`` seconds, saying how many like it were held back, and at most
    ``burst`` lines per interval in all.

    Every client waiting on one failed name gets a SERVFAIL; a burst of them
    would otherwise be thousands of identical WARNING lines.
    """

    def __init__(
        self,
        interval: float = 10.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self._seen: dict[tuple[str, int], list[float]] = {}  # key -> [logged at, held back]
        self._window = -interval
        self._lines = 0
        self._held = 0

    def note(self, name: str, ede: int, reason: str) -> None:
        """Log (or count) one SERVFAIL; the reason text may vary within one key
        (backoff times, error details), the line shows the latest."""
        now = self.clock()
        if now - self._window >= self.interval:
            if self._held:
                log.warning(
                    "%d more SERVFAIL lines were held back in %gs", self._held, self.interval
                )
            self._window, self._lines, self._held = now, 0, 0
            if len(self._seen) > 4096:
                self._seen = {
                    k: v for k, v in self._seen.items() if now - v[0] < self.interval or v[1]
                }
        key = (name, ede)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return
        if self._lines >= self.burst:
            self._held += 1
            return
        self._lines += 1
        more = f" (and {int(seen[1])} more like it)" if seen is not None and seen[1] else ""
        self._seen[key] = [now, 0]
        log.warning("SERVFAIL for %s: %s%s", name, reason, more)


class Resolver:
    """Answers raw DNS queries through one :class:`~doqproxy.upstream.base.Upstream`.

    With an :class:`~doqproxy.cache.policy.AnswerCache` it also caches answers, serves
    them stale when the upstream fails, refreshes popular entries before they
    expire, and sends identical concurrent misses upstream once.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        timeout: float = 5.0,
        opcodes: frozenset[int] = frozenset({wire.OPCODE_QUERY}),
        cache: AnswerCache | None = None,
        max_udp: int = wire.DEFAULT_MAX_UDP,
        local: LocalZones | None = None,
    ) -> None:
        self.upstream = upstream
        self.max_udp = max_udp
        """The largest UDP reply (``--max-udp-size``); the cache, if any, has the same."""
        self.local = local
        """Names answered here (localhost., private reverse zones, ...); swapped on reload."""
        self.timeout = timeout
        self.opcodes = opcodes
        self.stats = ResolverStats()
        self.cache = cache
        self._fetches: Coalescer[Outcome] = Coalescer()
        self._deadlines = Deadlines()
        self._background: set[asyncio.Task[None]] = set()
        self.failure_log = FailureLog()
        if cache is not None:
            cache.prefetch_hook = self._refresh

    def cached_reply(self, data: bytes, *, udp: bool, client: Any = None) -> bytes | None:
        """The reply straight from the cache, or ``None`` if :meth:`resolve` is needed.

        Synchronous, so a front end can answer hits without starting a task.
        ``client`` (the peer address) is for observers that wrap the resolver.
        """
        cache = self.cache
        if cache is None:
            return None
        reply = cache.fast_reply(data, udp)
        if reply is not None:
            self.stats.queries += 1
        return reply

    async def resolve(
        self, data: bytes, *, udp: bool, client: Any = None, cache_checked: bool = False
    ) -> bytes | None:
        """The reply to send for ``data``, or ``None`` to send nothing.

        ``client`` (the peer address) is for observers that wrap the resolver.
        ``cache_checked``: the caller just had :meth:`cached_reply` miss, so the
        fast cache path is not tried again.
        """
        if self.cache is not None and not cache_checked:
            reply = self.cache.fast_reply(data, udp)
            if reply is not None:
                self.stats.queries += 1
                return reply
        self.stats.queries += 1
        verdict = validate.classify(data, self.opcodes)
        if isinstance(verdict, validate.Rejected):
            if verdict.reply is None:
                self.stats.dropped += 1
            else:
                self.stats.rejected += 1
            log.debug("rejected query: %s", verdict.reason)
            return verdict.reply
        local = self.local
        if local:
            reply = local.reply(verdict, payload=self.max_udp)
            if reply is not None:
                answered.note("local", answered.mark())
                self.stats.local += 1
                rcode = wire.get_rcode(reply)
                self.stats.rcodes[rcode] = self.stats.rcodes.get(rcode, 0) + 1
                return reply
        return await self.forward(data, verdict, udp=udp)

    async def forward(self, data: bytes, question: Question, *, udp: bool) -> bytes:
        """Answer a valid query from the cache, else from the upstream."""
        cache = self.cache
        if cache is None:
            return self._reply(await self._fetch(data, question), question, udp=udp)
        stale = cache.lookup(question)
        if stale is not None:
            if cache.is_fresh(stale):
                return cache.reply(stale, data, question, udp=udp)
            if not cache.may_serve_stale(stale, question):
                stale = None
            elif cache.holding(stale):
                return cache.stale_reply(stale, question, udp=udp)
        task = self._fetches.start(
            (cache.key(question), question.flags & wire.FLAG_RD),
            lambda: self._fetch(data, question),
        )
        if stale is None:
            return self._reply(await self._fetches.wait(task), question, udp=udp)
        try:
            async with asyncio.timeout(cache.settings.stale_answer_timeout):
                outcome = await self._fetches.wait(task)
        except TimeoutError:
            return cache.stale_reply(stale, question, udp=udp)  # the fetch runs on
        if isinstance(outcome, Failure) or wire.get_rcode(outcome.response) == wire.RCODE_SERVFAIL:
            cache.hold_stale(stale)
            return cache.stale_reply(stale, question, udp=udp)
        return self._reply(outcome, question, udp=udp)

    async def _fetch(self, data: bytes, question: Question) -> Outcome:
        """Ask the upstream and, with a cache, keep the answer. Never raises for
        upstream trouble: the outcome is shared by every waiter."""
        message = rewrite.upstream_query(data, question, pad_block=self.upstream.pad_block)
        timeout = self.timeout  # a reload may change it while this query waits
        deadline = self._deadlines.start(timeout)  # asyncio.timeout's work, cheaper
        try:
            try:
                response = await self.upstream.query(message, question)
            except asyncio.CancelledError:
                if not deadline.expired():
                    raise
                raise TimeoutError from None
            finally:
                deadline.done()
            parsed = rewrite.check_response(response, question)
        except TimeoutError:
            reason = f"{self.upstream.name}: no answer within {timeout:g}s"
            return Failure(reason, Ede.NO_REACHABLE_AUTHORITY)
        except UpstreamError as exc:
            return Failure(f"{self.upstream.name}: {exc}", exc.ede)
        except rewrite.ResponseMismatch as exc:
            return Failure(f"{self.upstream.name}: {exc}", Ede.INVALID_DATA)
        except Exception:  # a bug must cost one SERVFAIL, never the client's reply
            log.exception("upstream query failed unexpectedly")
            return Failure(f"{self.upstream.name}: internal error", Ede.OTHER)
        if self.cache is not None:
            self.cache.store(question, response, parsed)
        return Answer(response, parsed)

    def _reply(self, outcome: Outcome, question: Question, *, udp: bool) -> bytes:
        if isinstance(outcome, Failure):
            return self._failure(question, outcome.reason, outcome.ede)
        reply = rewrite.client_reply(
            outcome.response, outcome.parsed, question, udp=udp, max_udp=self.max_udp
        )
        rcode = wire.get_rcode(reply)
        self.stats.rcodes[rcode] = self.stats.rcodes.get(rcode, 0) + 1
        if rcode == wire.RCODE_SERVFAIL:
            self.stats.servfails[None] = self.stats.servfails.get(None, 0) + 1
        return reply

    def _refresh(self, data: bytes, question: Question) -> asyncio.Task[None]:
        """Prefetch: refresh a cache entry in the background."""
        assert self.cache is not None
        key = (self.cache.key(question), question.flags & wire.FLAG_RD)
        fetch = self._fetches.start(key, lambda: self._fetch(data, question))
        task = asyncio.get_running_loop().create_task(self._await_refresh(fetch, question))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _await_refresh(self, fetch: asyncio.Task[Outcome], question: Question) -> None:
        outcome = await self._fetches.wait(fetch)
        if isinstance(outcome, Failure):
            log.info("prefetch of %s failed: %s", wire.name_text(question.qname), outcome.reason)

    async def settle(self) -> None:
        """Wait until no upstream fetch or background refresh is under way."""
        while self._background or len(self._fetches):
            await self._fetches.join()
            if self._background:
                await asyncio.wait(list(self._background))

    async def aclose(self) -> None:
        """Cancel background refreshes and fetches still in flight."""
        for task in list(self._background):
            task.cancel()
        await self._fetches.aclose()
        self._deadlines.close()

    def _failure(self, question: Question, reason: str, ede: Ede) -> bytes:
        self.stats.upstream_errors += 1
        self.stats.rcodes[wire.RCODE_SERVFAIL] = self.stats.rcodes.get(wire.RCODE_SERVFAIL, 0) + 1
        self.stats.servfails[ede] = self.stats.servfails.get(ede, 0) + 1
        self.failure_log.note(wire.name_text(question.qname), ede, reason)
        return wire.error_reply(
            question, wire.RCODE_SERVFAIL, payload=self.max_udp, ede=(ede, reason[:200])
        )
