"""Serve-stale, prefetch and coalescing: the parts of the cache that involve timing."""

from __future__ import annotations

import asyncio
import random

import dns.message
import dns.rcode

from doqproxy.cache.policy import AnswerCache, CacheSettings
from doqproxy.dns.ede import Ede
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import UpstreamError

from .cache_fakes import FakeClock, FakeUpstream, answer_a, ede_codes, make_query, ttls


def setup(**settings: object) -> tuple[Resolver, FakeUpstream, FakeClock, AnswerCache]:
    clock = FakeClock()
    cache = AnswerCache(CacheSettings(**settings), clock=clock)  # type: ignore[arg-type]
    upstream = FakeUpstream(answer_a("192.0.2.1", ttl=100))
    return Resolver(upstream, cache=cache), upstream, clock, cache


async def resolve(resolver: Resolver, query: bytes) -> bytes:
    reply = await resolver.resolve(query, udp=True)
    assert reply is not None
    return reply


async def test_stale_answer_when_upstream_is_down() -> None:
    resolver, upstream, clock, _ = setup()
    await resolve(resolver, make_query("www.example."))
    clock.advance(500)
    upstream.fail = UpstreamError("connection refused")
    reply = await resolve(resolver, make_query("www.example.", msg_id=42))
    message = dns.message.from_wire(reply)
    assert message.rcode() == dns.rcode.NOERROR and message.id == 42
    assert ttls(reply) == [30]
    assert ede_codes(reply) == [Ede.STALE_ANSWER]
    assert len(upstream.calls) == 2
    # Within the failure recheck time the upstream is not asked again.
    clock.advance(10)
    assert ttls(await resolve(resolver, make_query("www.example."))) == [30]
    assert len(upstream.calls) == 2
    clock.advance(21)
    await resolve(resolver, make_query("www.example."))
    assert len(upstream.calls) == 3


async def test_stale_answer_without_edns_has_no_opt() -> None:
    resolver, upstream, clock, _ = setup()
    await resolve(resolver, make_query("www.example."))
    clock.advance(500)
    upstream.fail = UpstreamError("down")
    message = dns.message.from_wire(await resolve(resolver, make_query("www.example.", edns=False)))
    assert message.edns == -1 and message.answer[0].ttl == 30


async def test_stale_when_upstream_answers_servfail() -> None:
    resolver, upstream, clock, _ = setup()
    await resolve(resolver, make_query("www.example."))
    clock.advance(500)
    upstream.zone = lambda q, r: r.set_rcode(dns.rcode.SERVFAIL)
    assert ttls(await resolve(resolver, make_query("www.example."))) == [30]


async def test_never_stale_for_rd0() -> None:
    resolver, upstream, clock, _ = setup()
    await resolve(resolver, make_query("www.example."))
    clock.advance(500)
    upstream.fail = UpstreamError("down")
    reply = dns.message.from_wire(await resolve(resolver, make_query("www.example.", rd=False)))
    assert reply.rcode() == dns.rcode.SERVFAIL


async def test_no_stale_when_disabled_or_too_old() -> None:
    resolver, upstream, clock, _ = setup(serve_stale=False)
    await resolve(resolver, make_query("www.example."))
    clock.advance(500)
    upstream.fail = UpstreamError("down")
    reply = dns.message.from_wire(await resolve(resolver, make_query("www.example.")))
    assert reply.rcode() == dns.rcode.SERVFAIL

    resolver, upstream, clock, cache = setup(serve_stale_max_age=3600)
    await resolve(resolver, make_query("www.example."))
    clock.advance(100 + 3599)
    upstream.fail = UpstreamError("down")
    assert ttls(await resolve(resolver, make_query("www.example."))) == [30]
    clock.advance(31)
    reply = dns.message.from_wire(await resolve(resolver, make_query("www.example.")))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert len(cache) == 0


async def test_stale_when_upstream_is_slow_and_refreshed_behind() -> None:
    resolver, upstream, clock, _ = setup(stale_answer_timeout=0.05)
    await resolve(resolver, make_query("www.example."))
    clock.advance(500)
    upstream.gate = asyncio.Event()
    reply = await resolve(resolver, make_query("www.example."))
    assert ttls(reply) == [30]  # the gate is still closed, so this came from the timer
    upstream.zone = answer_a("192.0.2.2", ttl=100)
    upstream.gate.set()
    await resolver.settle()
    fresh = dns.message.from_wire(await resolve(resolver, make_query("www.example.")))
    assert fresh.answer[0][0].address == "192.0.2.2" and fresh.answer[0].ttl == 100
    assert len(upstream.calls) == 2


async def test_prefetch_fires_exactly_once() -> None:
    resolver, upstream, clock, cache = setup()
    await resolve(resolver, make_query("www.example."))
    clock.advance(85)
    await resolve(resolver, make_query("www.example."))  # 85% of the TTL: no prefetch
    assert len(upstream.calls) == 1
    clock.advance(6)  # 91%: the last 10%
    upstream.gate = asyncio.Event()
    for i in range(20):
        reply = await resolve(resolver, make_query("www.example.", msg_id=i))
        assert ttls(reply) == [9]
    await asyncio.sleep(0)
    assert len(upstream.calls) == 2 and cache.stats.prefetches == 1
    upstream.gate.set()
    await resolver.settle()
    assert ttls(await resolve(resolver, make_query("www.example."))) == [100]
    assert len(upstream.calls) == 2


async def test_concurrent_misses_share_one_upstream_query() -> None:
    resolver, upstream, _, cache = setup()
    upstream.gate = asyncio.Event()
    rng = random.Random(5)
    queries = []
    for msg_id in rng.sample(range(65536), 100):
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in "www.example.")
        queries.append((msg_id, name, make_query(name, msg_id=msg_id)))
    tasks = [asyncio.create_task(resolve(resolver, q)) for _, _, q in queries]
    for _ in range(5):
        await asyncio.sleep(0)
    upstream.gate.set()
    replies = await asyncio.gather(*tasks)
    assert len(upstream.calls) == 1
    for (msg_id, name, _), reply in zip(queries, replies, strict=True):
        message = dns.message.from_wire(reply)
        assert message.id == msg_id
        assert message.question[0].name.to_text() == name
        assert message.answer[0][0].address == "192.0.2.1"
    assert len(cache) == 1


async def test_coalesced_waiters_all_get_servfail_on_failure() -> None:
    resolver, upstream, _, cache = setup()
    upstream.gate = asyncio.Event()
    upstream.fail = UpstreamError("down")
    tasks = [
        asyncio.create_task(resolve(resolver, make_query("www.example.", msg_id=i)))
        for i in range(10)
    ]
    await asyncio.sleep(0)
    upstream.gate.set()
    replies = [dns.message.from_wire(r) for r in await asyncio.gather(*tasks)]
    assert [r.id for r in replies] == list(range(10))
    assert {r.rcode() for r in replies} == {dns.rcode.SERVFAIL}
    assert len(upstream.calls) == 1 and len(cache) == 0
    await resolver.aclose()


async def test_failed_prefetch_can_be_tried_again_and_rd0_never_prefetches() -> None:
    resolver, upstream, clock, cache = setup()
    await resolve(resolver, make_query("www.example."))
    clock.advance(91)  # the last 10% of the TTL
    no_rd = bytearray(make_query("www.example."))
    no_rd[2] &= 0xFE
    await resolve(resolver, bytes(no_rd))
    await resolver.settle()
    assert len(upstream.calls) == 1 and cache.stats.prefetches == 0
    upstream.fail = UpstreamError("down")
    await resolve(resolver, make_query("www.example."))
    await resolver.settle()
    assert len(upstream.calls) == 2  # the prefetch went out and failed
    upstream.fail = None
    await resolve(resolver, make_query("www.example."))
    await resolver.settle()
    assert len(upstream.calls) == 3  # ...so the next hit may try again
    assert ttls(await resolve(resolver, make_query("www.example."))) == [100]
