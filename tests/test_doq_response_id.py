"""RFC 9250 §4.3.3: a DoQ response with a non-zero Message ID is a protocol error. The
connection is closed with DOQ_PROTOCOL_ERROR, that query gets SERVFAIL with an EDE and
is not cached, and the other queries on the connection are retried on a fresh one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest

from doqproxy.doq import framing

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]


async def ask(proxy: ProxyProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=15)


def test_check_doq_response() -> None:
    framing.check_doq_response(b"\0\0" + bytes(10))
    with pytest.raises(framing.DoqProtocolError, match="message ID 4660"):
        framing.check_doq_response(b"\x12\x34" + bytes(10))


async def test_nonzero_message_id_is_a_protocol_error(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 1.5
    proxy = start_proxy(upstream.port, "--timeout", "10", cache=True)
    assert (await ask(proxy, "a.test.")).answer
    # Slow queries in flight on the connection that is about to break (three types,
    # so that the proxy does not coalesce them into one).
    slow = [asyncio.ensure_future(ask(proxy, "slow.test.", t)) for t in ("A", "AAAA", "MX")]
    for _ in range(200):
        if upstream.seen_names().count("slow.test.") >= 3:
            break
        await asyncio.sleep(0.02)
    bad = await ask(proxy, "badid.test.")
    assert bad.rcode() == dns.rcode.SERVFAIL
    ede = [option for option in bad.options if option.otype == dns.edns.OptionType.EDE]
    assert ede and ede[0].code == 24 and "message ID" in ede[0].text, ede  # Invalid Data
    for _ in range(200):
        if 0x2 in upstream.state.close_codes:
            break
        await asyncio.sleep(0.02)
    assert upstream.state.close_codes == [framing.DoqError.PROTOCOL_ERROR]
    # The others were retried on a fresh connection and answered.
    replies = await asyncio.gather(*slow)
    assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies)
    assert replies[0].answer
    assert upstream.seen_names().count("slow.test.") == 6
    assert upstream.state.handshakes == 2
    # Nothing was cached: the next ask goes to the upstream again, and fails again.
    seen = upstream.seen_names().count("badid.test.")
    assert (await ask(proxy, "badid.test.")).rcode() == dns.rcode.SERVFAIL
    assert upstream.seen_names().count("badid.test.") == seen + 1
