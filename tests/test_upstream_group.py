"""Several upstreams, without sockets: health, selection, the state file and the group's
race (hedging, failover, SERVFAIL retry, the EDE 22 text) over in-process upstreams."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from doqproxy.dns import validate, wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.upstream import selection
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.group import Member, UpstreamGroup, answered_by, fit, short_name
from doqproxy.upstream.health import Health, HealthSettings, Reason, State, classify
from doqproxy.upstream.health_file import HealthFile
from doqproxy.upstream.selection import SelectionSettings, Strategy

# --- health -------------------------------------------------------------------------


def test_srtt_starts_at_the_first_sample_then_smooths() -> None:
    health = Health()
    health.sample(0.100, now=1.0)
    assert health.srtt == pytest.approx(0.100)
    health.sample(0.200, now=2.0)
    assert health.srtt == pytest.approx(0.100 + (0.200 - 0.100) / 8)  # rises slowly
    health.sample(0.020, now=3.0)
    assert health.srtt == pytest.approx(0.1125 + (0.020 - 0.1125) / 2)  # falls fast
    assert health.last_sample == 3.0


def test_slower_than_only_raises_the_estimate() -> None:
    health = Health()
    health.sample(0.010, now=0.0)
    health.slower_than(0.005, now=1.0)
    assert health.srtt == pytest.approx(0.010)
    health.slower_than(0.090, now=1.0)
    assert health.srtt == pytest.approx(0.020)


def test_silence_weighs_like_a_fall() -> None:
    health = Health(srtt=0.010)
    health.slower_than(0.050, now=1.0, silent=True)
    assert health.srtt == pytest.approx(0.030)  # half way, not an eighth
    health.slower_than(0.020, now=2.0, silent=True)
    assert health.srtt == pytest.approx(0.030)  # a lower bound never lowers it


def test_hard_failure_backs_off_exponentially_then_probes() -> None:
    health = Health(HealthSettings(backoff_base=1.0, backoff_cap=3.0))
    health.failed(Reason.TIMEOUT, "no reply", now=10.0)
    assert health.state is State.BACKOFF and health.retry_at == 11.0
    assert not health.probe_due(10.5) and health.probe_due(11.0)
    health.start_probe(11.0)
    assert health.state is State.PROBING and not health.probe_due(11.5)
    health.failed(Reason.CONNECT, "refused", now=11.5)
    assert health.state is State.BACKOFF and health.retry_at == 13.5  # twice as long
    health.start_probe(13.5)
    health.failed(Reason.CONNECT, "refused", now=14.0)
    assert health.retry_at == 17.0  # capped at 3 s
    health.srtt = 0.5  # inflated by the outage
    health.start_probe(17.0)
    health.answered(0.02, now=17.02)
    assert health.state is State.UP and health.backoffs == 0 and health.last_error == ""
    assert health.srtt == pytest.approx(0.02)  # a fresh start, not smoothed into 0.5
    assert health.failure_count(Reason.CONNECT) == 2 and health.failure_count(Reason.TIMEOUT) == 1


def test_servfail_alone_does_not_take_an_upstream_out() -> None:
    health = Health()
    for _ in range(4):
        health.failed(Reason.SERVFAIL, "", now=0.0)
    assert health.up
    health.answered(0.01, now=0.0)  # a good answer resets the streak
    for _ in range(4):
        health.failed(Reason.REFUSED, "", now=0.0)
    assert health.up
    health.failed(Reason.SERVFAIL, "", now=0.0)
    assert health.state is State.BACKOFF
    assert health.failure_count(Reason.SERVFAIL) == 5 and health.failure_count(Reason.REFUSED) == 4


def test_an_abandoned_probe_is_due_again() -> None:
    health = Health()
    health.failed(Reason.TIMEOUT, "x", now=0.0)
    health.start_probe(5.0)
    health.probe_abandoned(5.1)
    assert health.state is State.BACKOFF and health.probe_due(5.1)


@pytest.mark.parametrize(
    ("message", "ede", "reason"),
    [
        ("no reply from the server for 1.0s", Ede.NETWORK_ERROR, Reason.TIMEOUT),
        ("no handshake within 5s (no reply)", Ede.NETWORK_ERROR, Reason.TIMEOUT),
        ("TLS handshake failed (alert 48)", Ede.NETWORK_ERROR, Reason.TLS),
        ("connection failed: Connection refused", Ede.NETWORK_ERROR, Reason.CONNECT),
        ("unreachable (x); next attempt in 0.5s", Ede.NO_REACHABLE_AUTHORITY, Reason.CONNECT),
        ("bad DoQ answer: length", Ede.INVALID_DATA, Reason.PROTOCOL),
        ("server reset the stream (code 0x1)", Ede.NETWORK_ERROR, Reason.PROTOCOL),
    ],
)
def test_classify(message: str, ede: Ede, reason: Reason) -> None:
    assert classify(message, ede) is reason


# --- selection ----------------------------------------------------------------------


def healths(*srtts: float | None) -> list[Health]:
    out = []
    for srtt in srtts:
        health = Health()
        health.srtt = srtt
        out.append(health)
    return out


def test_fastest_orders_by_srtt_unmeasured_after_down_last() -> None:
    hs = healths(0.060, 0.005, None, 0.020, 0.001, None)
    hs[4].failed(Reason.TIMEOUT, "x", now=0.0)
    plan = selection.plan(Strategy.FASTEST, hs, now=0.0)
    assert plan.order == (1, 3, 0, 2, 5, 4) and plan.initial == 1
    assert selection.plan(Strategy.FASTEST, healths(None, None), now=0.0).order == (0, 1)


def test_failover_keeps_the_order_given_and_skips_the_down() -> None:
    hs = healths(0.060, 0.005, 0.020)
    hs[0].failed(Reason.CONNECT, "x", now=0.0)
    assert selection.plan(Strategy.FAILOVER, hs, now=0.0).order == (1, 2, 0)


def test_everything_down_soonest_retry_first() -> None:
    hs = healths(0.01, 0.01, 0.01)
    hs[0].failed(Reason.CONNECT, "x", now=5.0)
    hs[1].failed(Reason.CONNECT, "x", now=1.0)
    hs[2].failed(Reason.CONNECT, "x", now=3.0)
    assert selection.plan(Strategy.FASTEST, hs, now=6.0).order == (1, 2, 0)


def test_round_robin_and_parallel() -> None:
    hs = healths(0.03, 0.01, 0.02)
    orders = [selection.plan(Strategy.ROUND_ROBIN, hs, 0.0, turn=t).order for t in range(4)]
    assert orders == [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 1, 2)]
    plan = selection.plan(Strategy.PARALLEL, hs, 0.0, parallel=2)
    assert plan.order[:2] == (1, 2) and plan.initial == 2
    assert selection.plan(Strategy.PARALLEL, hs[:1], 0.0, parallel=3).initial == 1


@pytest.mark.parametrize(
    ("srtt", "delay"), [(None, 0.5), (0.001, 0.05), (0.02, 0.06), (0.1, 0.3), (1.0, 0.5)]
)
def test_hedge_delay_is_three_srtt_clamped(srtt: float | None, delay: float) -> None:
    health = Health(srtt=srtt)
    assert selection.hedge_delay(health, SelectionSettings()) == pytest.approx(delay)
    off = SelectionSettings(hedge=False)
    assert selection.hedge_delay(health, off) == float("inf")


def test_side_trips_probe_the_due_and_explore_the_stale() -> None:
    hs = healths(0.01, 0.02, 0.03, 0.04)
    for h in hs:
        h.last_sample = 9.5
        h.unmeasured = 100
    hs[1].failed(Reason.TIMEOUT, "x", now=0.0)  # due at 1.0
    hs[2].last_sample = 0.0  # stale
    hs[3].unmeasured = 49  # stale too, but too few queries went elsewhere meanwhile
    hs[3].last_sample = 0.0
    settings = SelectionSettings()
    probes, explore = selection.side_trips(hs, 10.0, busy=set(), chosen=[0], settings=settings)
    assert (probes, explore) == ([1], [2])
    probes, explore = selection.side_trips(hs, 10.0, busy={2}, chosen=[0], settings=settings)
    assert (probes, explore) == ([1], [])
    hs[0].srtt = None  # never measured: explored at once
    hs[0].last_sample = 9.9
    assert selection.side_trips(hs, 10.0, busy=set(), chosen=[2], settings=settings)[1] == [0]
    hs[0].srtt = 0.01
    failover = SelectionSettings(strategy=Strategy.FAILOVER)
    assert selection.side_trips(hs, 10.0, busy=set(), chosen=[0], settings=failover) == ([1], [])


def test_hedge_budget_allows_a_burst_then_a_share() -> None:
    budget = selection.HedgeBudget(ratio=0.1, burst=3.0, tokens=3.0)
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]
    for _ in range(9):
        budget.earn()
    assert not budget.spend()
    budget.earn()
    assert budget.spend() and not budget.spend()


async def test_over_the_hedge_budget_the_hedge_waits_for_the_maximum_delay() -> None:
    late, other = Fake("quic://a:853", after(0.1)), Fake("quic://b:853", after(0.0))
    group = group_of(late, other, srtts=(0.001, 0.02), hedge_min=0.01, hedge_max=0.4)
    group.hedge_budget.tokens = 0.0
    data, question = make_question()
    assert wire.get_rcode(await group.query(data, question)) == dns.rcode.NOERROR
    assert (late.calls, other.calls) == (1, 0)  # answered before hedge-delay-max
    assert group.members[1].stats.hedged == 0


async def test_over_the_hedge_budget_a_stalled_upstream_still_costs_one_hedge_max() -> None:
    stalled, other = Fake("quic://a:853", never()), Fake("quic://b:853", after(0.0))
    group = group_of(stalled, other, srtts=(0.001, 0.02), hedge_min=0.01, hedge_max=0.1)
    group.hedge_budget.tokens = 0.0
    data, question = make_question()
    started = time.monotonic()
    answer = await asyncio.wait_for(group.query(data, question), 3.0)
    assert wire.get_rcode(answer) == dns.rcode.NOERROR
    assert time.monotonic() - started < 3.0  # not the 4.75 s budget of the group
    assert other.calls == 1 and group.members[1].stats.hedged == 1
    health = group.members[0].health
    assert health.srtt is not None and health.srtt > 0.001  # the silence raised it


# --- the failure text -----------------------------------------------------------------


def test_short_names_and_fit() -> None:
    assert short_name("quic://dns.example:853") == "dns.example"
    assert short_name("quic://[::1]:8853") == "[::1]:8853"
    parts = [(f"upstream-{i}.example", "timeout (no answer within 4.8s) " * 5) for i in range(3)]
    text = fit("all 3 failed: ", parts, 180)
    assert len(text) <= 180
    assert all(f"upstream-{i}.example timeout" in text for i in range(3)), text
    assert fit("h: ", [("a", "short"), ("b", "x" * 500)], 60).startswith("h: a short; b xxx")


# --- the state file -------------------------------------------------------------------


class Named:
    def __init__(self, name: str, health: Health) -> None:
        self.name = name
        self.health = health


def test_health_file_round_trip(tmp_path: Path) -> None:
    fast, dead = Health(srtt=0.005), Health(srtt=0.02)
    dead.failed(Reason.TIMEOUT, "no reply", now=100.0)  # retry at 101
    HealthFile(tmp_path).save([Named("quic://a:853", fast), Named("quic://b:853", dead)], 100.0)
    path = tmp_path / "upstreams.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["version"] == 1
    loaded = HealthFile(tmp_path)
    a, b, c = Health(), Health(), Health()
    loaded.restore("quic://a:853", a, now=50.0)
    loaded.restore("quic://b:853", b, now=50.0)
    loaded.restore("quic://c:853", c, now=50.0)
    assert a.srtt == pytest.approx(0.005) and a.up
    assert b.state is State.BACKOFF and 50.0 <= b.retry_at <= 51.0
    assert "no reply" in b.last_error
    assert c.srtt is None and c.up


def test_health_file_is_not_rewritten_for_small_srtt_drift(tmp_path: Path) -> None:
    """The SRTT moves with every answer: only a real change (or a state change, or
    shutdown, or ten minutes) rewrites the file, so a router's flash is spared."""
    health = Health(srtt=0.010)
    members = [Named("quic://a:853", health)]
    store = HealthFile(tmp_path)
    path = tmp_path / "upstreams.json"

    def written() -> float | None:
        srtt = json.loads(path.read_text())["upstreams"]["quic://a:853"]["srtt"]
        return None if srtt is None else float(srtt)

    store.save(members, 100.0)
    assert written() == pytest.approx(0.010)
    health.srtt = 0.0103  # 3 %: not worth a write
    store.save(members, 105.0)
    assert written() == pytest.approx(0.010)
    health.srtt = 0.013  # 30 %: written at once
    store.save(members, 110.0)
    assert written() == pytest.approx(0.013)
    health.srtt = 0.0132
    store.save(members, 115.0)
    assert written() == pytest.approx(0.013)
    store.save(members, 115.0 + 600)  # drift is written after ten minutes
    assert written() == pytest.approx(0.0132)
    health.srtt = 0.0133
    store.save(members, 720.0, force=True)  # shutdown
    assert written() == pytest.approx(0.0133)
    health.failed(Reason.TIMEOUT, "no reply", now=721.0)  # a state change: at once
    store.save(members, 721.0)
    assert json.loads(path.read_text())["upstreams"]["quic://a:853"]["state"] != "up"


@pytest.mark.parametrize("kind", ["garbage", "version", "symlink", "fifo", "values"])
def test_bad_health_file_is_a_warning(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "upstreams.json"
    if kind == "garbage":
        path.write_bytes(b"\x00{not json")
    elif kind == "version":
        path.write_text('{"version": 99, "upstreams": {}}')
    elif kind == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text('{"version": 1, "upstreams": {"quic://a:853": {"srtt": 0.1}}}')
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        entry = '{"srtt": "fast", "saved": 0}'
        path.write_text(f'{{"version": 1, "saved": 0, "upstreams": {{"quic://a:853": {entry}}}}}')
    with caplog.at_level(logging.WARNING):
        health_file = HealthFile(tmp_path)
        health = Health()
        health_file.restore("quic://a:853", health, now=0.0)
    assert health.srtt is None and health.up
    assert any("upstreams.json" in r.getMessage() for r in caplog.records), caplog.text
    if kind != "fifo":  # a later save replaces the bad file (a FIFO stays: rename over it)
        health_file.save([Named("quic://a:853", Health(srtt=0.01))], 0.0)
        assert json.loads(path.read_text())["upstreams"]["quic://a:853"]["srtt"] == 0.01


# --- the group, over in-process upstreams ------------------------------------------------

Behaviour = Callable[[], Awaitable[bytes]]


def make_question() -> tuple[bytes, Question]:
    data = dns.message.make_query("a.test.", "A").to_wire()
    verdict = validate.classify(data, frozenset({wire.OPCODE_QUERY}))
    assert isinstance(verdict, Question)
    return data, verdict


def reply(rcode: int = dns.rcode.NOERROR) -> bytes:
    response = dns.message.make_response(dns.message.make_query("a.test.", "A"))
    response.set_rcode(rcode)
    return response.to_wire()


class Fake:
    """An in-process upstream whose answers the test scripts."""

    def __init__(self, name: str, behaviour: Behaviour) -> None:
        self.name = name
        self.pad_block: int | None = None
        self.behaviour = behaviour
        self.calls = 0
        self.cancelled = 0
        self.closed = False

    async def query(self, message: bytes, question: Question) -> bytes:
        self.calls += 1
        try:
            return await self.behaviour()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def aclose(self) -> None:
        self.closed = True


def after(seconds: float, rcode: int = dns.rcode.NOERROR) -> Behaviour:
    async def answer() -> bytes:
        await asyncio.sleep(seconds)
        return reply(rcode)

    return answer


def failing(message: str) -> Behaviour:
    async def fail() -> bytes:
        raise UpstreamError(message, Ede.NETWORK_ERROR)

    return fail


def never() -> Behaviour:
    async def hang() -> bytes:
        await asyncio.sleep(3600)
        raise AssertionError

    return hang


def group_of(
    *fakes: Fake,
    srtts: tuple[float | None, ...] = (),
    timeout: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    **settings: object,
) -> UpstreamGroup:
    members = []
    for index, fake in enumerate(fakes):
        health = Health()
        health.srtt = srtts[index] if index < len(srtts) else None
        health.last_sample = 1e18  # measured "just now": no exploration unless a test wants it
        members.append(Member(fake.name, fake, health))
    return UpstreamGroup(
        members,
        SelectionSettings(**settings),  # type: ignore[arg-type]
        timeout=timeout,
        clock=clock,
    )


async def test_fastest_asks_only_the_fastest_and_learns() -> None:
    slow, fast = Fake("quic://slow:853", after(0.0)), Fake("quic://fast:853", after(0.0))
    group = group_of(slow, fast, srtts=(0.05, 0.01))
    data, question = make_question()
    slot: list[str] = []
    token = answered_by.set(slot)
    try:
        for _ in range(5):
            assert wire.get_rcode(await group.query(data, question)) == dns.rcode.NOERROR
    finally:
        answered_by.reset(token)
    assert (slow.calls, fast.calls) == (0, 5)
    assert slot == ["quic://fast:853"] * 5
    fast_member = group.members[1]
    assert fast_member.stats.queries_sent == 5 and fast_member.stats.answers == 5
    assert fast_member.health.srtt is not None and fast_member.health.srtt < 0.01


async def test_a_stalled_upstream_is_hedged_and_its_srtt_climbs() -> None:
    stalled, backup = Fake("quic://a:853", never()), Fake("quic://b:853", after(0.0))
    group = group_of(stalled, backup, srtts=(0.001, 0.02), hedge_min=0.02)
    data, question = make_question()
    for _ in range(3):
        assert wire.get_rcode(await group.query(data, question)) == dns.rcode.NOERROR
    await asyncio.sleep(0.01)  # the cancellations are delivered
    first, second = group.members
    assert stalled.calls >= 1 and stalled.cancelled == stalled.calls
    assert second.stats.hedged >= 1 and second.stats.races_won >= 1
    assert first.health.srtt is not None and first.health.srtt > 0.001


async def test_a_failure_moves_on_at_once_without_waiting_for_the_hedge() -> None:
    broken, good = (
        Fake("quic://a:853", failing("connection failed: refused")),
        Fake("quic://b:853", after(0.0)),
    )
    group = group_of(broken, good, srtts=(0.001, 0.02), hedge_min=5.0, hedge_max=5.0)
    data, question = make_question()
    answer = await asyncio.wait_for(group.query(data, question), 2.0)
    assert wire.get_rcode(answer) == dns.rcode.NOERROR
    assert group.members[0].health.state is State.BACKOFF
    assert group.members[0].health.failure_count(Reason.CONNECT) == 1
    assert group.members[1].stats.hedged == 0


async def test_all_failed_is_ede_22_naming_each() -> None:
    fakes = [
        Fake("quic://one.example:853", failing("connection failed: Connection refused")),
        Fake("quic://two.example:8853", failing("TLS handshake failed (alert 48)")),
        Fake("quic://three.example:853", never()),
    ]
    group = group_of(*fakes, timeout=0.6, hedge_min=0.01, hedge_max=0.01)
    data, question = make_question()
    with pytest.raises(UpstreamError) as caught:
        await group.query(data, question)
    await asyncio.sleep(0.01)
    assert caught.value.ede is Ede.NO_REACHABLE_AUTHORITY
    text = str(caught.value)
    assert text.startswith("all 3 failed: ")
    assert "one.example connect" in text and "two.example:8853 tls" in text
    assert "three.example timeout" in text
    assert len(text) + len(group.name) + 2 <= 200
    assert fakes[2].cancelled >= 1


async def test_a_timer_firing_early_at_the_deadline_is_no_crash() -> None:
    """The loop's timer may fire a hair before our clock reaches the deadline; with every
    upstream already asked, that once launched past the end of the list (IndexError)."""
    fakes = [Fake("quic://a:853", never()), Fake("quic://b:853", never())]
    base = time.monotonic()

    def slow_clock() -> float:  # the loop's timers fire early by this clock
        return base + (time.monotonic() - base) * 0.98

    group = group_of(*fakes, timeout=0.4, clock=slow_clock, hedge_min=0.01, hedge_max=0.01)
    data, question = make_question()
    with pytest.raises(UpstreamError) as caught:
        await group.query(data, question)
    assert caught.value.ede is Ede.NO_REACHABLE_AUTHORITY
    assert "a timeout" in str(caught.value) and "b timeout" in str(caught.value)


async def test_over_the_hedge_budget_an_upstream_that_answers_others_is_waited_for() -> None:
    """Overload, not a stall: it answered something after this query went out."""
    slow, other = Fake("quic://a:853", after(0.3)), Fake("quic://b:853", after(0.0))
    group = group_of(slow, other, srtts=(0.001, 0.02), hedge_min=0.01, hedge_max=0.05)
    group.hedge_budget.tokens = 0.0
    data, question = make_question()

    async def heard_meanwhile() -> None:
        await asyncio.sleep(0.02)
        group.members[0].health.last_heard = group.clock()

    task = asyncio.ensure_future(heard_meanwhile())
    assert wire.get_rcode(await group.query(data, question)) == dns.rcode.NOERROR
    await task
    assert (slow.calls, other.calls) == (1, 0)


async def test_servfail_asks_one_other_upstream() -> None:
    bad = Fake("quic://a:853", after(0.0, dns.rcode.SERVFAIL))
    good = Fake("quic://b:853", after(0.0))
    spare = Fake("quic://c:853", after(0.0))
    group = group_of(bad, good, spare, srtts=(0.001, 0.002, 0.003))
    data, question = make_question()
    assert wire.get_rcode(await group.query(data, question)) == dns.rcode.NOERROR
    assert (bad.calls, good.calls, spare.calls) == (1, 1, 0)
    assert group.members[0].health.failure_count(Reason.SERVFAIL) == 1


async def test_refused_twice_is_passed_on_after_one_retry() -> None:
    fakes = [Fake(f"quic://{n}:853", after(0.0, dns.rcode.REFUSED)) for n in "abc"]
    group = group_of(*fakes, srtts=(0.001, 0.002, 0.003))
    data, question = make_question()
    slot: list[str] = []
    token = answered_by.set(slot)
    try:
        assert wire.get_rcode(await group.query(data, question)) == dns.rcode.REFUSED
    finally:
        answered_by.reset(token)
    assert [f.calls for f in fakes] == [1, 1, 0]
    assert slot == ["quic://b:853"]  # the query log names whose answer it was


async def test_parallel_races_two_and_cancels_the_loser() -> None:
    quick, slow = Fake("quic://a:853", after(0.0)), Fake("quic://b:853", after(2.0))
    third = Fake("quic://c:853", after(0.0))
    group = group_of(
        slow, quick, third, srtts=(0.01, 0.02, 0.03), strategy=Strategy.PARALLEL, parallel=2
    )
    data, question = make_question()
    assert wire.get_rcode(await group.query(data, question)) == dns.rcode.NOERROR
    await asyncio.sleep(0)
    assert (slow.calls, quick.calls, third.calls) == (1, 1, 0)
    assert slow.cancelled == 1
    assert group.members[1].stats.races_won == 1


async def test_a_known_dead_upstream_costs_nothing_and_is_probed_aside() -> None:
    dead = Fake("quic://a:853", never())
    good = Fake("quic://b:853", after(0.0))
    group = group_of(dead, good, srtts=(0.001, 0.02), timeout=1.0)
    group.members[0].health.failed(Reason.TIMEOUT, "x", now=group.clock() - 100)  # due now
    data, question = make_question()
    answer = await asyncio.wait_for(group.query(data, question), 0.5)
    assert wire.get_rcode(answer) == dns.rcode.NOERROR
    assert group.members[0].health.state is State.PROBING  # a side trip, nobody waits
    await asyncio.sleep(1.2)  # the probe's own deadline
    assert group.members[0].health.state is State.BACKOFF
    assert group.members[0].health.backoffs == 2


async def test_one_member_is_a_pass_through_with_the_members_error() -> None:
    only = Fake("quic://a:853", failing("connection failed: refused"))
    group = group_of(only)
    assert group.name == "quic://a:853"
    data, question = make_question()
    with pytest.raises(UpstreamError, match="connection failed: refused"):
        await group.query(data, question)
    await group.aclose()
    assert only.closed


def test_error_label_keeps_series_bounded() -> None:
    from doqproxy.ops.metrics import error_label

    first = error_label("unreachable (no handshake within 5s); next attempt in 1.2s")
    assert first == error_label("unreachable (no handshake within 5s); next attempt in 3.75s")
    assert "quic://192.0.2.1:853" in error_label("quic://192.0.2.1:853: refused")
