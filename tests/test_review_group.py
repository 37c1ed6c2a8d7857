"""Review findings in the upstream group's race (in-process upstreams, as in
test_upstream_group)."""

from __future__ import annotations

import asyncio

import dns.rcode

from doqproxy.dns import wire
from doqproxy.upstream.selection import Strategy

from .test_upstream_group import Fake, after, group_of, make_question, never


async def test_a_servfail_then_a_stalled_second_chance_does_not_wait_the_whole_timeout() -> None:
    """After a SERVFAIL the group asks one other upstream; when that one stalled, the
    held SERVFAIL disabled hedging and the client waited the group's whole budget
    (about --timeout) for it. Now the second chance gets one hedge delay."""
    bad = Fake("quic://a:853", after(0.0, dns.rcode.SERVFAIL))
    stalled = Fake("quic://b:853", never())
    spare = Fake("quic://c:853", after(0.0))
    group = group_of(
        bad, stalled, spare, srtts=(0.001, 0.002, 0.003), timeout=5.0,
        hedge_min=0.02, hedge_max=0.05,
    )  # fmt: skip
    data, question = make_question()
    answer = await asyncio.wait_for(group.query(data, question), 2.0)
    assert wire.get_rcode(answer) == dns.rcode.SERVFAIL
    assert (bad.calls, stalled.calls) == (1, 1)
    await asyncio.sleep(0.01)
    assert stalled.cancelled == 1


async def test_parallel_servfail_leaves_the_slower_racer_its_own_hedge_delay() -> None:
    """Racing two, a quick SERVFAIL must not cut off the other racer before its own
    hedge delay: its NOERROR answer wins."""
    slower = Fake("quic://a:853", after(0.15))  # not measured yet: raced first
    bad = Fake("quic://b:853", after(0.0, dns.rcode.SERVFAIL))
    group = group_of(
        slower, bad, srtts=(None, 0.001), strategy=Strategy.PARALLEL, parallel=2,
        hedge_min=0.02, hedge_max=0.5,
    )  # fmt: skip
    data, question = make_question()
    answer = await asyncio.wait_for(group.query(data, question), 2.0)
    assert wire.get_rcode(answer) == dns.rcode.NOERROR
