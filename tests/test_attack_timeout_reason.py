"""A reload that changes ``timeout`` while queries wait: their SERVFAIL's EDE text
names the timeout they actually had, not the new one (found by the attack session:
queries cut off after 4 s said "no answer within 30s")."""

from __future__ import annotations

import asyncio

import dns.edns
import dns.message
import dns.rcode

from doqproxy.resolver import Resolver

from .cache_fakes import FakeUpstream, make_query


async def test_the_timeout_text_is_the_one_the_query_had() -> None:
    upstream = FakeUpstream()
    upstream.gate = asyncio.Event()  # never answers
    resolver = Resolver(upstream, timeout=0.3)
    pending = asyncio.get_running_loop().create_task(
        resolver.resolve(make_query("slow.example."), udp=True)
    )
    await asyncio.sleep(0.05)
    resolver.timeout = 30.0  # what a SIGHUP reload does
    reply = await asyncio.wait_for(pending, 20)
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.rcode() == dns.rcode.SERVFAIL
    texts = [o.text for o in message.options if isinstance(o, dns.edns.EDEOption)]
    assert texts and "within 0.3s" in texts[0], texts
    await resolver.aclose()
