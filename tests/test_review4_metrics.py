"""Review of the route metrics: /metrics stays one valid exposition with several DoQ
upstreams (each metric family once, as the text format and OpenMetrics require)."""

from __future__ import annotations

import asyncio
import collections
import urllib.request

import dns.asyncquery
import dns.message
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from .conftest import Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .lan_helpers import scrape

OPENMETRICS = "application/openmetrics-text;version=1.0.0"


async def _ask(port: int, name: str) -> None:
    query = dns.message.make_query(name, "A", use_edns=0)
    await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)


def _fetch(port: int, accept: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(reply.read().decode())


async def test_each_upstream_family_once(
    upstream: DoqTestUpstream, start_proxy: object, certs: Certs
) -> None:
    """Two -u upstreams and a route: before, every DoQ upstream got metric families of
    its own (``# TYPE doqproxy_upstream_handshakes_total`` three times), which
    OpenMetrics parsers (what Prometheus asks for first) reject as clashing names."""
    servers = [DoqTestUpstream(certs.cert_file, certs.key_file) for _ in range(2)]
    for server in servers:
        await server.start()
    second, routed = (str(s.port) for s in servers)
    try:
        metrics = free_port()
        proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
            upstream.port,
            "-u", f"quic://127.0.0.1:{second}",
            "--route", f"solo.test=quic://127.0.0.1:{routed}",
            "--metrics-listen", f"127.0.0.1:{metrics}",
        )  # fmt: skip
        for name in ("a.test", "b.test", "x.solo.test"):
            await _ask(proxy.port, name)
        await asyncio.to_thread(scrape, metrics)  # waits for the endpoint

        text = await asyncio.to_thread(_fetch, metrics, "text/plain")
        types = collections.Counter(line for line in text.splitlines() if line.startswith("# TYPE"))
        assert [line for line, count in types.items() if count > 1] == []

        exposition = await asyncio.to_thread(_fetch, metrics, OPENMETRICS)
        families = {f.name: f for f in text_string_to_metric_families(exposition)}
        handshakes = families["doqproxy_upstream_handshakes"]
        ports = {s.labels["upstream"].rsplit(":", 1)[-1] for s in handshakes.samples}
        assert ports == {str(upstream.port), second, routed}
    finally:
        for server in servers:
            await server.stop()


def _sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (metric, _), value in samples.items() if metric == name)


async def test_an_upstream_named_twice_counts_all_its_traffic(
    upstream: DoqTestUpstream, start_proxy: object, certs: Certs
) -> None:
    """A route to the -u upstreams gets pools and a group of its own with the same names.
    Before, /metrics showed the first of a name only: the route's queries and
    handshakes were on no series at all (the servers saw more than /metrics said)."""
    other = DoqTestUpstream(certs.cert_file, certs.key_file)
    await other.start()
    first, second = (f"quic://127.0.0.1:{s.port}" for s in (upstream, other))
    try:
        metrics = free_port()
        proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
            upstream.port,
            "-u", second,
            "--route", f"pair.test={first},{second}",
            "--route", f"same.test={first}",
            "--metrics-listen", f"127.0.0.1:{metrics}",
        )  # fmt: skip
        names = [f"n{i}.test" for i in range(4)] + [f"n{i}.pair.test" for i in range(4)]
        for name in [*names, "x.same.test", "y.same.test"]:
            await _ask(proxy.port, name)
        samples = await asyncio.to_thread(scrape, metrics)

        seen = [str(q.message.question[0].name) for q in (*upstream.state.seen, *other.state.seen)]
        assert len(seen) >= 10
        # Group members only: a route of one upstream has no member table.
        grouped = [name for name in seen if not name.endswith("same.test.")]
        assert _sum(samples, "doqproxy_upstream_queries_sent_total") >= len(grouped)
        handshakes = upstream.state.handshakes + other.state.handshakes
        assert handshakes >= 3  # -u's pools and the routes' (one per URL, shared)
        assert _sum(samples, "doqproxy_upstream_handshakes_total") >= handshakes
    finally:
        await other.stop()
