"""Cache policy through the resolver pipeline, with a fake upstream and a fake clock."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from doqproxy.cache.policy import AnswerCache, CacheSettings, make_cache
from doqproxy.dns import wire
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import UpstreamError

from .cache_fakes import (
    FakeClock,
    FakeUpstream,
    Zone,
    answer_a,
    make_query,
    nodata,
    nxdomain,
    rcode_only,
    ttls,
)


def setup(
    zone: Zone | None = None, **settings: object
) -> tuple[Resolver, FakeUpstream, FakeClock, AnswerCache]:
    clock = FakeClock()
    cache = AnswerCache(CacheSettings(**settings), clock=clock)  # type: ignore[arg-type]
    upstream = FakeUpstream(zone)
    return Resolver(upstream, cache=cache), upstream, clock, cache


async def ask(resolver: Resolver, query: bytes, *, udp: bool = True) -> dns.message.Message:
    reply = await resolver.resolve(query, udp=udp)
    assert reply is not None
    return dns.message.from_wire(reply)


async def test_hit_skips_upstream_and_ages_ttls() -> None:
    resolver, upstream, clock, _ = setup(answer_a("192.0.2.1", ttl=300))
    first = await resolver.resolve(make_query("www.example."), udp=True)
    assert first is not None and ttls(first) == [300]
    clock.advance(10.4)
    second = await resolver.resolve(make_query("www.example.", msg_id=77), udp=True)
    assert second is not None
    assert ttls(second) == [290]
    assert wire.get_id(second) == 77
    clock.advance(0.5)  # same whole second: same TTLs
    assert ttls(await resolver.resolve(make_query("www.example."), udp=True) or b"") == [290]
    clock.advance(0.2)
    assert ttls(await resolver.resolve(make_query("www.example."), udp=True) or b"") == [289]
    assert len(upstream.calls) == 1


async def test_entry_expires_after_ttl_without_serve_stale() -> None:
    resolver, upstream, clock, _ = setup(answer_a("192.0.2.1", ttl=60), serve_stale=False)
    await resolver.resolve(make_query("www.example."), udp=True)
    clock.advance(59.9)
    await resolver.resolve(make_query("www.example."), udp=True)
    assert len(upstream.calls) == 1
    clock.advance(0.2)
    reply = await ask(resolver, make_query("www.example."))
    assert len(upstream.calls) == 2
    assert reply.answer[0].ttl == 60


async def test_0x20_spelling_survives() -> None:
    resolver, upstream, _, _ = setup()
    await resolver.resolve(make_query("www.example."), udp=True)
    query = make_query("wWw.ExAmPlE.", msg_id=0xBEEF)
    reply = await resolver.resolve(query, udp=True)
    assert reply is not None and len(upstream.calls) == 1
    name_end = 12 + len(b"\x03wWw\x07ExAmPlE\x00")
    assert reply[12:name_end] == query[12:name_end]
    assert reply[:2] == b"\xbe\xef"
    message = dns.message.from_wire(reply)
    assert message.question[0].name.to_text() == "wWw.ExAmPlE."
    assert message.answer[0].name.to_text() == "wWw.ExAmPlE."  # compression pointer


@pytest.mark.parametrize("udp", [True, False])
async def test_do_and_cd_are_separate_entries(udp: bool) -> None:
    resolver, upstream, _, _ = setup()
    variants = [(False, False), (True, False), (False, True), (True, True)]
    for do, cd in variants * 2:
        reply = await ask(resolver, make_query("www.example.", do=do, cd=cd), udp=udp)
        assert bool(reply.flags & dns.flags.CD) == cd
        assert bool(reply.ednsflags & dns.flags.DO) == do
    assert len(upstream.calls) == 4


async def test_opt_only_when_client_sent_one() -> None:
    resolver, upstream, _, _ = setup()
    with_edns = await ask(resolver, make_query("www.example.", payload=4096))
    assert with_edns.edns == 0 and with_edns.payload == 1232
    without = await ask(resolver, make_query("www.example.", edns=False))
    assert without.edns == -1
    again = await ask(resolver, make_query("www.example.", payload=512))
    assert again.edns == 0 and again.payload == 1232
    assert len(upstream.calls) == 1


async def test_rd_bit_echoed_from_the_query() -> None:
    resolver, upstream, _, _ = setup()
    await resolver.resolve(make_query("www.example."), udp=True)
    reply = await ask(resolver, make_query("www.example.", rd=False))
    assert not reply.flags & dns.flags.RD
    assert len(upstream.calls) == 1


async def test_rd0_answers_are_not_stored() -> None:
    resolver, upstream, _, _ = setup()
    await resolver.resolve(make_query("www.example.", rd=False), udp=True)
    await resolver.resolve(make_query("www.example."), udp=True)
    assert len(upstream.calls) == 2


async def test_nxdomain_is_cached_by_name() -> None:
    resolver, upstream, clock, _ = setup(nxdomain(soa_ttl=600, minimum=300))
    first = await ask(resolver, make_query("gone.example.", "A"))
    assert first.rcode() == dns.rcode.NXDOMAIN
    clock.advance(100)
    for rdtype in ("AAAA", "MX", "TXT"):
        reply = await ask(resolver, make_query("GONE.example.", rdtype))
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert reply.question[0].rdtype == dns.rdatatype.from_text(rdtype)
        assert reply.question[0].name.to_text() == "GONE.example."
        assert reply.authority[0].ttl == 200  # min(600, 300) - 100
    assert len(upstream.calls) == 1
    clock.advance(200)
    await resolver.resolve(make_query("gone.example.", "A"), udp=True)
    assert len(upstream.calls) == 2


async def test_negative_ttl_is_capped() -> None:
    resolver, upstream, clock, _ = setup(nxdomain(3600, 3600), max_negative_ttl=60)
    await resolver.resolve(make_query("gone.example."), udp=True)
    clock.advance(59)
    assert ttls(await resolver.resolve(make_query("gone.example."), udp=True) or b"") == [1]
    clock.advance(1)
    await resolver.resolve(make_query("gone.example."), udp=True)
    assert len(upstream.calls) == 2


async def test_nodata_is_cached_by_name_and_type() -> None:
    resolver, upstream, _, _ = setup(nodata(soa_ttl=120, minimum=900))
    first = await ask(resolver, make_query("empty.example.", "AAAA"))
    assert first.rcode() == dns.rcode.NOERROR and not first.answer
    assert first.authority[0].ttl == 120
    again = await ask(resolver, make_query("empty.example.", "AAAA"))
    assert again.authority[0].ttl == 120
    assert len(upstream.calls) == 1
    await resolver.resolve(make_query("empty.example.", "MX"), udp=True)
    assert len(upstream.calls) == 2


@pytest.mark.parametrize("zone", [nxdomain(with_soa=False), nodata(with_soa=False)])
async def test_negative_without_soa_is_not_cached(zone: Zone) -> None:
    resolver, upstream, _, cache = setup(zone)
    await resolver.resolve(make_query("gone.example."), udp=True)
    await resolver.resolve(make_query("gone.example."), udp=True)
    assert len(upstream.calls) == 2
    assert len(cache) == 0


async def test_noerror_for_a_name_drops_its_nxdomain_entry() -> None:
    resolver, upstream, clock, cache = setup(nxdomain(minimum=60))
    await resolver.resolve(make_query("flip.example."), udp=True)
    clock.advance(61)  # expired, but kept for serve-stale
    upstream.zone = answer_a("192.0.2.7")
    reply = await ask(resolver, make_query("flip.example.", "AAAA"))
    assert reply.rcode() == dns.rcode.NOERROR
    upstream.fail = UpstreamError("down")
    # Without the NXDOMAIN entry, nothing stale exists for TXT: SERVFAIL, not NXDOMAIN.
    reply = await ask(resolver, make_query("flip.example.", "TXT"))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert len(cache) == 1


@pytest.mark.parametrize(
    "zone",
    [
        rcode_only(dns.rcode.SERVFAIL),
        rcode_only(dns.rcode.REFUSED),
        rcode_only(dns.rcode.FORMERR),
    ],
)
async def test_error_rcodes_are_never_cached(zone: Zone) -> None:
    resolver, upstream, _, cache = setup(zone, serve_stale=False)
    for _ in range(2):
        await resolver.resolve(make_query("www.example."), udp=True)
    assert len(upstream.calls) == 2 and len(cache) == 0


def _set_tc(response: bytes) -> bytes:
    return response[:2] + bytes((response[2] | 0x02,)) + response[3:]


def _other_question(response: bytes) -> bytes:
    return response[:13] + b"X" + response[14:]


def _chop(response: bytes) -> bytes:
    return response[:-3]


@pytest.mark.parametrize("mangle", [_set_tc, _other_question, _chop])
async def test_truncated_mismatched_and_malformed_are_never_cached(mangle: object) -> None:
    resolver, upstream, _, cache = setup()
    upstream.mangle = mangle  # type: ignore[assignment]
    for _ in range(2):
        await resolver.resolve(make_query("www.example."), udp=True)
    assert len(upstream.calls) == 2 and len(cache) == 0


async def test_ttl_bounds() -> None:
    resolver, upstream, clock, _ = setup(answer_a("192.0.2.1", ttl=5), min_ttl=60)
    first = await ask(resolver, make_query("short.example."))
    assert first.answer[0].ttl == 5  # the fresh reply is passed through
    clock.advance(30)
    assert ttls(await resolver.resolve(make_query("short.example."), udp=True) or b"") == [30]
    assert len(upstream.calls) == 1

    resolver, upstream, clock, _ = setup(answer_a("192.0.2.1", ttl=999999), max_ttl=100)
    await resolver.resolve(make_query("long.example."), udp=True)
    clock.advance(1)
    assert ttls(await resolver.resolve(make_query("long.example."), udp=True) or b"") == [99]
    clock.advance(99)
    await resolver.resolve(make_query("long.example."), udp=True)
    assert len(upstream.calls) == 2


async def test_ttl_zero_is_not_cached() -> None:
    resolver, upstream, _, _ = setup(answer_a("192.0.2.1", ttl=0))
    for _ in range(2):
        await resolver.resolve(make_query("zero.example."), udp=True)
    assert len(upstream.calls) == 2


async def test_disabled_cache() -> None:
    assert make_cache(CacheSettings(enabled=False)) is None
    upstream = FakeUpstream()
    resolver = Resolver(upstream, cache=make_cache(CacheSettings(enabled=False)))
    for _ in range(2):
        await resolver.resolve(make_query("www.example."), udp=True)
    assert len(upstream.calls) == 2


async def test_cached_answer_truncated_over_udp() -> None:
    addresses = [f"192.0.2.{i}" for i in range(1, 60)]
    resolver, upstream, _, _ = setup(answer_a(*addresses))
    big = await ask(resolver, make_query("big.example.", payload=4096))
    assert len(big.answer[0]) == 59
    small = await resolver.resolve(make_query("big.example.", msg_id=9, edns=False), udp=True)
    assert small is not None and len(small) <= 512
    parsed = dns.message.from_wire(small)
    assert parsed.flags & dns.flags.TC and parsed.id == 9 and not parsed.answer
    assert parsed.edns == -1
    limited = await ask(resolver, make_query("big.example.", payload=600))
    assert limited.flags & dns.flags.TC and limited.edns == 0
    over_tcp = await ask(resolver, make_query("big.example.", edns=False), udp=False)
    assert len(over_tcp.answer[0]) == 59 and not over_tcp.flags & dns.flags.TC
    assert len(upstream.calls) == 1


async def test_unusual_queries_still_validated() -> None:
    resolver, upstream, _, _ = setup()
    await resolver.resolve(make_query("www.example."), udp=True)
    query = make_query("www.example.")
    as_response = query[:2] + bytes((query[2] | 0x80,)) + query[3:]
    assert await resolver.resolve(as_response, udp=True) is None
    message = dns.message.make_query("www.example.", "A", use_edns=1)
    reply = await ask(resolver, message.to_wire())
    assert reply.rcode() == dns.rcode.BADVERS
    trailing = await ask(resolver, query + b"\x00")
    assert trailing.rcode() == dns.rcode.FORMERR
    assert len(upstream.calls) == 1


async def test_hit_through_the_long_way() -> None:
    """A query that skips the fast path (the DoQ front end, tests) still hits."""
    resolver, upstream, clock, cache = setup()
    await resolver.resolve(make_query("www.example."), udp=True)
    clock.advance(3)
    message = dns.message.make_query("wWw.example.", "A", use_edns=0)
    message.id = 555
    data = message.to_wire()
    reply = dns.message.from_wire(await resolver.forward(data, wire.parse_question(data), udp=True))
    assert reply.id == 555 and reply.answer[0].ttl == 297
    assert reply.question[0].name.to_text() == "wWw.example."
    assert len(upstream.calls) == 1 and cache.stats.hits == 1


async def test_a_query_carrying_records_is_formerr_not_a_hit() -> None:
    resolver, upstream, _clock, cache = setup()
    await resolver.resolve(make_query("www.example."), udp=True)
    message = dns.message.make_query("www.example.", "A", use_edns=0)
    message.additional.append(dns.rrset.from_text("x.example.", 1, "IN", "A", "192.0.2.3"))
    reply = await ask(resolver, message.to_wire())
    assert reply.rcode() == dns.rcode.FORMERR and not reply.answer
    assert len(upstream.calls) == 1 and cache.stats.hits == 0
