from __future__ import annotations

import dns.asyncquery
import dns.message
import dns.rcode

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream


async def test_smoke(upstream: DoqTestUpstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy: ProxyProcess = start_proxy(upstream.port)
    q = dns.message.make_query("a.test.", "A")
    r = await dns.asyncquery.udp(q, "127.0.0.1", port=proxy.port, timeout=5)
    assert r.rcode() == dns.rcode.NOERROR, proxy.stderr()
    assert r.answer[0][0].address == "192.0.2.1"
    r = await dns.asyncquery.tcp(q, "127.0.0.1", port=proxy.port, timeout=5)
    assert r.answer[0][0].address == "192.0.2.1"
    assert upstream.ids_seen() == [0, 0]
    assert proxy.stop() == 0
