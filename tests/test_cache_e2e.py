"""The answer cache end to end: a real ``doqproxy forward`` process with its cache
on, the aioquic test upstream, and real clients (dnspython, dig)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]


async def ask(
    proxy: ProxyProcess, name: str, rdtype: str = "A", **kw: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)


async def test_second_query_is_a_hit_with_aged_ttl_and_client_spelling(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, cache=True)
    first = await ask(proxy, "a.test.")
    assert first.answer[0].ttl == 300
    await asyncio.sleep(1.2)
    second = await ask(proxy, "A.tEsT.")
    assert len(upstream.state.seen) == 1
    assert second.question[0].name.to_text() == "A.tEsT."
    assert second.answer[0][0].address == "192.0.2.1"
    assert second.answer[0].ttl in (298, 299)


async def test_100_identical_concurrent_misses_one_upstream_query(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 0.5
    proxy = start_proxy(upstream.port, cache=True)
    rng = random.Random(3)

    async def one() -> None:
        query = dns.message.make_query("slow.test.", "A")
        query.id = rng.randrange(65536)
        response = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
        assert response.id == query.id
        assert response.answer[0][0].address == "192.0.2.9"

    await asyncio.gather(*(one() for _ in range(100)))
    assert upstream.seen_names() == ["slow.test."]


async def test_negative_answers_are_cached(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, cache=True)
    assert (await ask(proxy, "nope.test.")).rcode() == dns.rcode.NXDOMAIN
    # NXDOMAIN is cached by name, whatever the type.
    assert (await ask(proxy, "nope.test.", "AAAA")).rcode() == dns.rcode.NXDOMAIN
    assert upstream.seen_names() == ["nope.test."]


async def test_do_and_cd_are_kept_apart(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, cache=True)
    await ask(proxy, "a.test.", use_edns=0)
    await ask(proxy, "a.test.", use_edns=0, want_dnssec=True)
    cd = dns.message.make_query("a.test.", "A", use_edns=0)
    cd.flags |= dns.flags.CD
    await dns.asyncquery.udp(cd, "127.0.0.1", port=proxy.port, timeout=10)
    await ask(proxy, "a.test.", use_edns=0, want_dnssec=True)
    assert len(upstream.state.seen) == 3


async def test_stale_answer_when_upstream_is_down(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--cache-max-ttl", "1", "--timeout", "2", cache=True)
    assert (await ask(proxy, "a.test.")).answer
    await upstream.stop()
    await asyncio.sleep(1.5)  # the entry has expired
    stale = await ask(proxy, "a.test.", use_edns=0)
    assert stale.rcode() == dns.rcode.NOERROR
    assert stale.answer[0].ttl == 30
    assert any(o.otype == dns.edns.OptionType.EDE and o.code == 3 for o in stale.options)
    # Never stale when the client asked for no recursion (RFC 8767 §5).
    query = dns.message.make_query("a.test.", "A")
    query.flags &= ~dns.flags.RD
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
    assert reply.rcode() == dns.rcode.SERVFAIL


async def test_cached_answers_truncate_over_udp(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, cache=True)
    query = dns.message.make_query("mid.test.", "TXT")
    full = await dns.asyncquery.tcp(query, "127.0.0.1", port=proxy.port, timeout=10)
    assert len(full.answer[0]) == 3
    truncated = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    assert len(upstream.state.seen) == 1


async def test_dig_sees_the_cache(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, cache=True)
    for _ in range(3):
        proc = await asyncio.create_subprocess_exec(
            "dig", "@127.0.0.1", "-p", str(proxy.port), "+short", "+tries=1", "a.test", "MX",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert out.decode().strip() == "10 mail.a.test."
    assert len(upstream.state.seen) == 1
