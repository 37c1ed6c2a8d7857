"""The resolver counts SERVFAILs by the EDE it attached (``doqproxy_servfail_total{ede}``)."""

from __future__ import annotations

import asyncio

import dns.rcode

from doqproxy.dns.ede import Ede
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import UpstreamError

from .cache_fakes import FakeUpstream, make_query


async def rcode(resolver: Resolver, name: str) -> int:
    reply = await resolver.resolve(make_query(name), udp=True)
    assert reply is not None
    return reply[3] & 0x0F


async def test_servfails_by_ede() -> None:
    upstream = FakeUpstream()
    resolver = Resolver(upstream, timeout=0.2)
    assert await rcode(resolver, "ok.example.") == dns.rcode.NOERROR
    assert resolver.stats.servfails == {}

    upstream.fail = UpstreamError("connection refused")  # EDE 23, Network Error
    for _ in range(2):
        assert await rcode(resolver, "down.example.") == dns.rcode.SERVFAIL
    upstream.fail = None
    upstream.gate = asyncio.Event()  # never answers: EDE 22 after the timeout
    assert await rcode(resolver, "slow.example.") == dns.rcode.SERVFAIL
    upstream.gate = None
    upstream.zone = lambda query, response: response.set_rcode(dns.rcode.SERVFAIL)
    assert await rcode(resolver, "broken.example.") == dns.rcode.SERVFAIL  # the upstream's own

    assert resolver.stats.servfails == {
        Ede.NETWORK_ERROR: 2,
        Ede.NO_REACHABLE_AUTHORITY: 1,
        None: 1,
    }
    assert resolver.stats.rcodes[dns.rcode.SERVFAIL] == 4
    await resolver.aclose()
