"""The cache without the resolver: bounds, entry building, and fast-path equivalence."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doqproxy.cache.entry import ENTRY_OVERHEAD
from doqproxy.cache.policy import AnswerCache, CacheSettings
from doqproxy.dns import rewrite, wire

from .cache_fakes import (
    FakeClock,
    Zone,
    answer_a,
    fresh_reply,
    make_query,
    nodata,
    nxdomain,
    upstream_answer,
)


def store(cache: AnswerCache, query: bytes, zone: Zone) -> bool:
    question = wire.parse_question(query)
    response = upstream_answer(zone, query)
    return cache.store(question, response, rewrite.check_response(response, question))


def test_entry_bound_evicts_least_recently_used() -> None:
    cache = AnswerCache(CacheSettings(max_entries=5), clock=FakeClock())
    for i in range(20):
        assert store(cache, make_query(f"n{i}.example."), answer_a("192.0.2.1"))
        if i == 10:
            assert cache.fast_reply(make_query("n8.example."), udp=True) is not None
    assert len(cache) == 5
    assert cache.fast_reply(make_query("n19.example."), udp=True) is not None
    assert cache.fast_reply(make_query("n0.example."), udp=True) is None


def test_replacing_an_entry_does_not_evict_others() -> None:
    cache = AnswerCache(CacheSettings(max_entries=3), clock=FakeClock())
    for i in range(3):
        store(cache, make_query(f"n{i}.example."), answer_a("192.0.2.1"))
    store(cache, make_query("n1.example."), answer_a("192.0.2.2"))
    assert len(cache) == 3


def test_byte_bound_enforced() -> None:
    limit = 10 * ENTRY_OVERHEAD
    cache = AnswerCache(CacheSettings(max_bytes=limit), clock=FakeClock())
    for i in range(50):
        addresses = [f"192.0.2.{j}" for j in range(1, 2 + i % 7)]
        store(cache, make_query(f"n{i}.example."), answer_a(*addresses))
        assert cache.currsize <= limit
    assert 5 <= len(cache) < 10
    assert cache.fast_reply(make_query("n49.example."), udp=True) is not None


def test_answer_larger_than_the_cache_is_not_stored() -> None:
    cache = AnswerCache(CacheSettings(max_bytes=ENTRY_OVERHEAD + 100), clock=FakeClock())
    addresses = [f"192.0.2.{j}" for j in range(1, 50)]
    assert not store(cache, make_query("big.example."), answer_a(*addresses))
    assert cache.stats.not_stored == {"larger than the cache": 1}


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        CacheSettings(min_ttl=10, max_ttl=5)
    with pytest.raises(ValueError):
        CacheSettings(max_entries=0)


def test_opt_not_last_is_not_cached() -> None:
    cache = AnswerCache(clock=FakeClock())
    query = make_query("www.example.")
    question = wire.parse_question(query)
    response = upstream_answer(answer_a("192.0.2.1"), query)
    parsed = wire.parse_question(response)
    assert parsed.edns is not None
    opt = response[parsed.edns.start : parsed.edns.end]
    glue = b"\x02ns\x07example\x00" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 53])
    moved = response[:10] + b"\x00\x02" + response[12 : parsed.edns.start] + opt + glue
    assert not cache.store(question, moved, rewrite.check_response(moved, question))
    assert cache.stats.not_stored == {"OPT is not the last record": 1}


def test_fast_path_and_long_way_agree() -> None:
    clock = FakeClock()
    cache = AnswerCache(clock=clock)
    store(cache, make_query("www.example."), answer_a("192.0.2.1", "192.0.2.2"))
    clock.advance(7.5)
    for query in (
        make_query("WWW.example.", msg_id=1),
        make_query("www.EXAMPLE.", msg_id=2, edns=False),
        make_query("www.example.", msg_id=3, rd=False),
        make_query("www.example.", msg_id=4, payload=100),
    ):
        fast = cache.fast_reply(query, udp=True)
        question = wire.parse_question(query)
        entry = cache.lookup(question)
        assert entry is not None and fast is not None
        assert fast == cache.reply(entry, query, question, udp=True)


_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
_NAME = st.lists(_LABEL, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".")
_TTL = st.integers(min_value=1, max_value=86400)
_RDATA = {
    "A": st.ip_addresses(v=4).map(str),
    "AAAA": st.ip_addresses(v=6).map(str),
    "TXT": st.text("abcdef xyz", max_size=40).map(lambda t: f'"{t}"'),
    "MX": st.tuples(st.integers(0, 100), _NAME).map(lambda p: f"{p[0]} {p[1]}"),
    "CNAME": _NAME,
}


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, int, str, list[str]]]]:
    """A question and the answer-section RRsets (name, TTL, type, rdatas) for it."""
    qname = draw(_NAME)
    qtype = draw(st.sampled_from(sorted(_RDATA)))
    rrsets = []
    for _ in range(draw(st.integers(1, 3))):
        rtype = draw(st.sampled_from([qtype, "CNAME"]))
        rdatas = draw(st.lists(_RDATA[rtype], min_size=1, max_size=4, unique=True))
        rrsets.append(
            (qname if rtype == qtype or not rrsets else draw(_NAME), draw(_TTL), rtype, rdatas)
        )
    return qname, qtype, rrsets


def _flip_case(name: str, mask: int) -> str:
    return "".join(c.upper() if (mask >> (i % 60)) & 1 else c for i, c in enumerate(name))


@settings(max_examples=150, deadline=None)
@given(
    answer=answers(),
    ids=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    masks=st.tuples(st.integers(0, 2**60), st.integers(0, 2**60)),
    edns=st.booleans(),
    do=st.booleans(),
    udp=st.booleans(),
    age=st.integers(0, 3600),
)
def test_cached_reply_equals_fresh_reply_except_id_and_ttls(
    answer: tuple[str, str, list[tuple[str, int, str, list[str]]]],
    ids: tuple[int, int],
    masks: tuple[int, int],
    edns: bool,
    do: bool,
    udp: bool,
    age: int,
) -> None:
    qname, qtype, rrsets = answer

    def zone(query: dns.message.Message, response: dns.message.Message) -> None:
        for name, ttl, rtype, rdatas in rrsets:
            response.answer.append(dns.rrset.from_text(name, ttl, "IN", rtype, *rdatas))

    clock = FakeClock()
    cache = AnswerCache(clock=clock)
    first = make_query(_flip_case(qname, masks[0]), qtype, msg_id=ids[0], edns=edns, do=do)
    response = upstream_answer(zone, first)
    question = wire.parse_question(first)
    assert cache.store(question, response, rewrite.check_response(response, question))

    clock.advance(age)
    second = make_query(_flip_case(qname, masks[1]), qtype, msg_id=ids[1], edns=edns, do=do)
    cached = cache.fast_reply(second, udp=udp)
    min_ttl = min(ttl for _, ttl, _, _ in rrsets)
    if age >= min_ttl:
        assert cached is None
        return
    assert cached is not None
    fresh = fresh_reply(response, second, udp=udp)
    assert len(cached) == len(fresh)
    assert cached[:2] == fresh[:2] == ids[1].to_bytes(2, "big")
    assert cached[12 : question.question_end] == second[12 : question.question_end]

    got, want = dns.message.from_wire(cached), dns.message.from_wire(fresh)
    assert got.flags == want.flags and got.rcode() == want.rcode()
    assert (got.edns, got.payload, got.ednsflags) == (want.edns, want.payload, want.ednsflags)
    assert got.options == want.options
    for got_section, want_section in zip(got.sections, want.sections, strict=True):
        assert got_section == want_section  # RRset equality ignores TTLs
        for got_rrset, want_rrset in zip(got_section, want_section, strict=True):
            assert got_rrset.name.to_text() == want_rrset.name.to_text()  # same spelling
            if got_section is not got.question:
                assert got_rrset.ttl == want_rrset.ttl - age


def test_nxdomain_reply_for_another_type() -> None:
    cache = AnswerCache(clock=FakeClock())

    def nx(query: dns.message.Message, response: dns.message.Message) -> None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        soa = "ns.example. hostmaster.example. 1 7200 900 1209600 300"
        response.authority.append(dns.rrset.from_text("example.", 900, "IN", "SOA", soa))

    store(cache, make_query("gone.example.", "A"), nx)
    reply = cache.fast_reply(make_query("Gone.example.", "HTTPS", msg_id=7), udp=True)
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.rcode() == dns.rcode.NXDOMAIN and message.id == 7
    assert message.question[0].rdtype == dns.rdatatype.HTTPS
    assert message.question[0].name == dns.name.from_text("gone.example.")
    assert message.authority[0].ttl == 300
    assert message.flags & dns.flags.QR


def test_reconfigure_keeps_entries_within_new_bounds() -> None:
    cache = AnswerCache(CacheSettings(), clock=FakeClock())
    for i in range(20):
        assert store(cache, make_query(f"n{i}.example."), answer_a("192.0.2.1"))
    cache.reconfigure(CacheSettings(max_entries=5, max_ttl=60))
    assert len(cache) == 5
    assert cache.fast_reply(make_query("n19.example."), udp=True) is not None
    assert store(cache, make_query("new.example."), answer_a("192.0.2.1"))
    assert len(cache) == 5


def test_cached_nxdomain_never_answers_types_validation_refuses() -> None:
    cache = AnswerCache(CacheSettings(), clock=FakeClock())
    assert store(cache, make_query("gone.example."), nxdomain())
    assert cache.fast_reply(make_query("gone.example.", "AAAA"), udp=True) is not None
    for rdtype in ("AXFR", "IXFR", "TSIG", "TKEY", "OPT"):
        query = make_query("gone.example.", rdtype)
        assert cache.fast_reply(query, udp=True) is None, rdtype


def _cname_then(negative: Zone, cname_ttl: int) -> Zone:
    def fill(query: dns.message.Message, response: dns.message.Message) -> None:
        name = query.question[0].name
        response.answer.append(dns.rrset.from_text(name, cname_ttl, "IN", "CNAME", "t.example."))
        negative(query, response)

    return fill


def test_nxdomain_after_a_short_cname_lives_as_long_as_the_cname() -> None:
    clock = FakeClock()
    cache = AnswerCache(CacheSettings(), clock=clock)
    assert store(cache, make_query("c.example."), _cname_then(nxdomain(600, 300), cname_ttl=5))
    assert cache.fast_reply(make_query("c.example."), udp=True) is not None
    clock.advance(6)
    assert cache.fast_reply(make_query("c.example."), udp=True) is None


def test_nodata_after_a_cname_is_negative() -> None:
    clock = FakeClock()
    cache = AnswerCache(CacheSettings(), clock=clock)
    zone = _cname_then(nodata(600, 60), cname_ttl=1800)
    assert store(cache, make_query("c.example."), zone)
    clock.advance(61)  # past the SOA MINIMUM: negative TTL, not the CNAME's 1800
    assert cache.fast_reply(make_query("c.example."), udp=True) is None
