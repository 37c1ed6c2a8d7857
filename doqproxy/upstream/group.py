"""Several upstreams behind one :class:`~doqproxy.upstream.base.Upstream`.

:class:`UpstreamGroup` asks its members in the order :func:`selection.plan`
gives (the strategy), hedges to the next one when an answer is late, fails
over at once when one fails, and keeps each member's :class:`Health` up to
date from what happens. The first usable answer wins; the other attempts are
cancelled (a DoQ member then resets its stream with DOQ_REQUEST_CANCELLED).

A SERVFAIL or REFUSED answer is kept, and one other upstream is asked before
it is passed on. When every upstream failed, the error names each one's
reason, shortened to fit an EDE EXTRA-TEXT.

Members are any Upstream; a member with an ``on_handshake`` attribute (the DoQ
pool) also reports handshake RTTs, and one with ``start()`` is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.padding import repad
from doqproxy.dns.wire import Question
from doqproxy.upstream import selection
from doqproxy.upstream.base import Upstream, UpstreamError
from doqproxy.upstream.health import Health, Reason, classify
from doqproxy.upstream.health_file import HealthFile
from doqproxy.upstream.selection import SelectionSettings

log = logging.getLogger(__name__)

EXTRA_TEXT_LIMIT = 200
"""What the resolver keeps of an error's text for the EDE EXTRA-TEXT."""

SAVE_INTERVAL = 5.0
"""Seconds between writes of the health file (only when something changed)."""

answered_by: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "doqproxy_answered_by", default=None
)
"""A list a caller may put in the context: the group appends the name of the
upstream whose answer it returned (the query log uses it)."""

_SOFT_RCODES = {wire.RCODE_SERVFAIL: Reason.SERVFAIL, wire.RCODE_REFUSED: Reason.REFUSED}


@dataclass(slots=True)
class MemberStats:
    """Counters per member, for metrics."""

    queries_sent: int = 0
    answers: int = 0
    hedged: int = 0
    """Queries sent to this upstream because the one before it was late."""
    races_won: int = 0
    """Answers that won while another upstream was asked the same question."""


@dataclass(slots=True, eq=False)
class Member:
    """One upstream of a group, with what the group learned about it."""

    key: Hashable
    """Identity across reloads: a member with the same key is kept as it is."""
    upstream: Upstream
    health: Health = field(default_factory=Health)
    stats: MemberStats = field(default_factory=MemberStats)
    call: Upstream | None = None
    """What queries go through (``upstream``, possibly wrapped for timing)."""
    started: bool = False

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def queued(self) -> int:
        """Queries waiting inside the member for a connection (0 if it does not say)."""
        return int(getattr(self.upstream, "queued_now", 0))


@dataclass(slots=True)
class _Attempt:
    member: Member
    started: float
    hedge: bool


class UpstreamGroup:
    """An Upstream made of several; with one member it is a thin pass-through."""

    def __init__(
        self,
        members: Sequence[Member],
        settings: SelectionSettings | None = None,
        *,
        timeout: float = 5.0,
        health_file: HealthFile | None = None,
        wrap: Callable[[Upstream], Upstream] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not members:
            raise ValueError("an upstream group needs at least one upstream")
        self.members = tuple(members)
        self.settings = settings if settings is not None else SelectionSettings()
        self.timeout = timeout
        self.health_file = health_file
        self.clock = clock
        self.name = members[0].name if len(members) == 1 else f"{len(members)} upstreams"
        self.pad_block = next(
            (m.upstream.pad_block for m in members if m.upstream.pad_block is not None), None
        )
        for member in members:
            member.call = wrap(member.upstream) if wrap is not None else member.upstream
            if hasattr(member.upstream, "on_handshake"):
                member.upstream.on_handshake = self._handshake_hook(member)
        self._turn = 0
        self.hedge_budget = selection.HedgeBudget()
        self._side: dict[Member, asyncio.Task[None]] = {}
        self._saver: asyncio.Task[None] | None = None

    def _handshake_hook(self, member: Member) -> Callable[[float], None]:
        def observed(rtt: float) -> None:
            member.health.sample(rtt, self.clock())

        return observed

    @property
    def budget(self) -> float:
        """The group's own deadline: a little under the resolver's, so that a failure
        names every upstream instead of ending in the resolver's plain timeout."""
        return max(0.05, self.timeout - min(0.25, self.timeout / 10))

    @property
    def side_trip_limit(self) -> float:
        """How long a probe or an exploration may take before it counts as a timeout:
        an upstream that slow would not be chosen anyway, and a short limit lets a
        dead one reach backoff (and a recovered one come back) in a few seconds."""
        return min(self.budget, max(1.0, 2 * self.settings.hedge_max))

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the members that can start (prepared first flights) and the saver."""
        for member in self.members:
            start = getattr(member.upstream, "start", None)
            if callable(start) and not member.started:
                start()
            member.started = True
        if self._saver is None and self.health_file is not None and self.health_file.enabled:
            self._saver = asyncio.ensure_future(self._save_every(SAVE_INTERVAL))

    def detach(self) -> None:
        """Stop this group's background work without closing members (a reload took
        them over); side trips in flight finish on their own."""
        if self._saver is not None:
            self._saver.cancel()
            self._saver = None

    async def aclose(self) -> None:
        """Close every member and save the health file."""
        self.detach()
        for task in list(self._side.values()):
            task.cancel()
        await asyncio.gather(*(m.upstream.aclose() for m in self.members), return_exceptions=True)
        self.save(force=True)

    def save(self, *, force: bool = False) -> None:
        if self.health_file is not None:
            self.health_file.save(self.members, self.clock(), force=force)

    async def _save_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.save()

    # --- queries ------------------------------------------------------------------

    async def query(self, message: bytes, question: Question) -> bytes:
        if len(self.members) == 1:
            return await self._only(self.members[0], message, question)
        return await self._race(message, question)

    async def _only(self, member: Member, message: bytes, question: Question) -> bytes:
        """One upstream: no race, no tasks; the resolver's timeout applies."""
        assert member.call is not None
        member.stats.queries_sent += 1
        started = self.clock()
        try:
            answer = await member.call.query(message, question)
        except UpstreamError as exc:
            member.health.failed(classify(str(exc), exc.ede), str(exc), self.clock())
            raise
        except asyncio.CancelledError:
            member.health.slower_than(self.clock() - started, self.clock())
            raise
        self._settle(member, answer, started)
        _tell_caller(member)
        return answer

    async def _race(self, message: bytes, question: Question) -> bytes:
        members = self.members
        settings = self.settings
        now = self.clock()
        deadline = now + self.budget
        plan = selection.plan(
            settings.strategy,
            [m.health for m in members],
            now,
            turn=self._turn,
            parallel=settings.parallel,
        )
        self._turn += 1
        self.hedge_budget.earn()
        for member in members:
            member.health.unmeasured += 1
        hedging = settings.hedge
        order = [members[i] for i in plan.order]
        running: dict[asyncio.Task[bytes], _Attempt] = {}
        errors: dict[Member, str] = {}
        fallback: bytes | None = None
        fallback_from: Member | None = None
        second_chance = True
        position = 0
        last: _Attempt | None = None
        denied: _Attempt | None = None  # the attempt whose early hedge the budget refused

        def launch(hedge: bool) -> None:
            nonlocal position, last
            member = order[position]
            position += 1
            if member.health.probe_due(self.clock()):
                member.health.start_probe(self.clock())
            member.stats.queries_sent += 1
            member.stats.hedged += hedge
            assert member.call is not None
            outgoing = self._for(member, message)
            task = asyncio.ensure_future(member.call.query(outgoing, question))
            last = running[task] = _Attempt(member, self.clock(), hedge)

        for _ in range(plan.initial):
            launch(hedge=False)
        self._side_trips(message, question, order[: plan.initial])
        try:
            while True:
                can_launch = position < len(order) and fallback is None
                if not running:
                    if fallback is not None:
                        if second_chance and position < len(order):
                            second_chance = False
                            launch(hedge=False)
                            continue
                        break
                    if not can_launch:
                        break
                    launch(hedge=False)  # the last one failed: the next one at once
                    continue
                wake = deadline
                if fallback is not None:  # each one still asked gets its own hedge delay
                    wake = min(wake, max(_due(a, settings) for a in running.values()))
                elif can_launch and hedging and last is not None:
                    hedge = selection.hedge_delay(last.member.health, settings)
                    if denied is last:
                        hedge = max(hedge, settings.hedge_max)
                    wake = min(wake, last.started + hedge)
                done, _ = await asyncio.wait(
                    running,
                    timeout=max(0.0, wake - self.clock()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    if self.clock() >= deadline:
                        break
                    if fallback is not None:  # the other upstream is late: pass the SERVFAIL on
                        break
                    if wake >= deadline or last is None:
                        continue  # the timer fired a hair early: wait out the rest
                    now = self.clock()
                    # Late by 3 x its SRTT: that alone says it is slower than thought.
                    health = last.member.health
                    silent = health.last_heard < last.started
                    health.slower_than(now - last.started, now, silent=silent)
                    if denied is not last and self.hedge_budget.spend():
                        launch(hedge=True)
                    elif denied is not last:
                        denied = last  # over budget: hedge only at --hedge-delay-max...
                    elif silent:
                        launch(hedge=True)  # ...and only if it has gone silent
                    else:
                        # It answers other queries, just late: we are overloaded, and
                        # a hedge would only add load. This query waits for it.
                        hedging = False
                    continue
                for task in done:
                    attempt = running.pop(task)
                    answer = self._outcome(task, attempt, errors)
                    if answer is None:
                        continue
                    if attempt.member in errors:  # SERVFAIL or REFUSED: ask one other
                        if fallback is None and running:
                            second_chance = False  # one still running is the other
                        fallback, fallback_from = answer, attempt.member
                        continue
                    attempt.member.stats.races_won += position > 1
                    self._cancel_losers(running)
                    running.clear()
                    _tell_caller(attempt.member)
                    return answer
            if fallback is not None and fallback_from is not None:
                _tell_caller(fallback_from)
                return fallback
            now = self.clock()
            for attempt in running.values():
                text = f"no answer within {now - attempt.started:.1f}s"
                attempt.member.health.failed(Reason.TIMEOUT, text, now)
                errors[attempt.member] = f"timeout ({text})"
            raise UpstreamError(self.describe_failure(errors), Ede.NO_REACHABLE_AUTHORITY)
        finally:
            self._cancel_losers(running)

    def _for(self, member: Member, message: bytes) -> bytes:
        """``message`` (padded for the group) as ``member`` should get it: members of a
        route may mix transports, and plain DNS gets no padding (RFC 8467)."""
        block = member.upstream.pad_block
        return message if block == self.pad_block else repad(message, block)

    def _outcome(
        self, task: asyncio.Task[bytes], attempt: _Attempt, errors: dict[Member, str]
    ) -> bytes | None:
        """The answer of a finished attempt (SERVFAIL included), or ``None`` after
        recording why it failed."""
        member = attempt.member
        now = self.clock()
        if task.cancelled():  # closed under us (a reload retired it): no verdict on health
            errors[member] = "cancelled"
            return None
        exc = task.exception()
        if exc is None:
            answer = task.result()
            soft = self._settle(member, answer, attempt.started)
            if soft is not None:
                errors[member] = str(soft)
            return answer
        if isinstance(exc, UpstreamError):
            reason = classify(str(exc), exc.ede)
            member.health.failed(reason, str(exc), now)
            errors[member] = f"{reason} ({exc})"
        else:
            log.error("%s: unexpected error: %r", member.name, exc)
            member.health.failed(Reason.PROTOCOL, "internal error", now)
            errors[member] = "internal error"
        return None

    def _settle(self, member: Member, answer: bytes, started: float) -> Reason | None:
        """Record an answer; the reason when it is SERVFAIL or REFUSED."""
        now = self.clock()
        rtt = now - started
        member.health.last_heard = now
        soft = _SOFT_RCODES.get(wire.get_rcode(answer)) if len(answer) >= 4 else Reason.PROTOCOL
        if soft is None:
            member.stats.answers += 1
            member.health.answered(rtt, now)
            return None
        member.health.sample(rtt, now)
        member.health.failed(soft, "", now)
        return soft

    def _cancel_losers(self, running: dict[asyncio.Task[bytes], _Attempt]) -> None:
        now = self.clock()
        for task, attempt in running.items():
            if task.done():
                if not task.cancelled():
                    task.exception()  # retrieved: a loser's error is of no interest
                continue
            task.cancel()
            attempt.member.health.slower_than(now - attempt.started, now)
            attempt.member.health.probe_abandoned(now)

    # --- side trips: probes and exploration -------------------------------------

    def _side_trips(self, message: bytes, question: Question, chosen: Sequence[Member]) -> None:
        members = self.members
        index = {m: i for i, m in enumerate(members)}
        busy = {index[m] for m in self._side if m in index}
        probes, explore = selection.side_trips(
            [m.health for m in members],
            self.clock(),
            busy=busy,
            chosen=[index[m] for m in chosen],
            settings=self.settings,
        )
        for i in probes + explore:
            member = members[i]
            if i in probes:
                member.health.start_probe(self.clock())
            task = asyncio.ensure_future(self._side_trip(member, message, question))
            self._side[member] = task
            task.add_done_callback(self._side_done(member))

    def _side_done(self, member: Member) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._side.pop(member, None)

        return done

    async def _side_trip(self, member: Member, message: bytes, question: Question) -> None:
        """A copy of a query that no client waits for: its outcome only feeds health."""
        assert member.call is not None
        member.stats.queries_sent += 1
        started = self.clock()
        limit = self.side_trip_limit
        try:
            async with asyncio.timeout(limit):
                answer = await member.call.query(self._for(member, message), question)
        except TimeoutError:
            text = f"no answer within {limit:.1f}s"
            member.health.failed(Reason.TIMEOUT, text, self.clock())
        except UpstreamError as exc:
            member.health.failed(classify(str(exc), exc.ede), str(exc), self.clock())
        except asyncio.CancelledError:
            member.health.probe_abandoned(self.clock())
            raise
        except Exception as exc:  # a bug in a member must not end as an unretrieved task
            log.error("%s: unexpected error: %r", member.name, exc)
        else:
            self._settle(member, answer, started)

    # --- failure text -----------------------------------------------------------

    def describe_failure(self, errors: dict[Member, str]) -> str:
        """``all N upstreams failed: A timeout; B connect (…)``, cut to fit."""
        budget = EXTRA_TEXT_LIMIT - len(self.name) - 2
        parts: list[tuple[str, str]] = []
        for member in self.members:
            text = errors.get(member)
            if text is None:
                last = member.health.last_error
                text = f"skipped, {last}" if last else "skipped"
            parts.append((short_name(member.name), text))
        return fit(f"all {len(parts)} failed: ", parts, budget)


def short_name(name: str) -> str:
    """``quic://dns.example:853`` → ``dns.example``; other ports and schemes stay."""
    if name.startswith("quic://"):
        name = name[len("quic://") :]
        if name.endswith(":853"):
            name = name[: -len(":853")]
    return name


def fit(head: str, parts: Sequence[tuple[str, str]], budget: int) -> str:
    """``head`` then ``NAME TEXT`` joined by ``; ``, each TEXT cut so the whole fits
    ``budget`` characters (names are kept whole while they fit)."""
    names = [name for name, _ in parts]
    fixed = len(head) + sum(len(n) + 1 for n in names) + 2 * (len(parts) - 1)
    room = max(0, budget - fixed)
    texts = [text for _, text in parts]
    # Short texts keep all they need; the rest share what is left equally.
    share = room // max(1, len(texts))
    spare = room - sum(min(len(t), share) for t in texts)
    cut: list[str] = []
    for text in texts:
        allowed = share
        if len(text) > share and spare > 0:
            extra = min(spare, len(text) - share)
            allowed += extra
            spare -= extra
        cut.append(text if len(text) <= allowed else text[: max(0, allowed - 1)] + "…")
    result = head + "; ".join(f"{n} {t}".rstrip() for n, t in zip(names, cut, strict=True))
    return result[:budget]


def _due(attempt: _Attempt, settings: SelectionSettings) -> float:
    """When ``attempt`` is late enough to hedge (or to give up on, after a SERVFAIL)."""
    return attempt.started + selection.hedge_delay(attempt.member.health, settings)


def _tell_caller(member: Member) -> None:
    slot = answered_by.get()
    if slot is not None:
        slot.append(member.name)


def close_later(upstreams: Sequence[Upstream], grace: float) -> asyncio.Task[None]:
    """Close upstreams a reload removed, once their in-flight queries had ``grace``."""

    async def later() -> None:
        await asyncio.sleep(grace)
        for upstream in upstreams:
            with contextlib.suppress(Exception):
                await upstream.aclose()

    return asyncio.get_running_loop().create_task(later())
