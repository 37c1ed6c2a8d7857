"""Route upstreams on /metrics: a single DoQ upstream behind a route and the members of
a route's group show up like the -u upstreams, once each."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import dns.asyncquery
import dns.message

from .conftest import Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .lan_helpers import scrape


async def _ask(port: int, name: str) -> None:
    query = dns.message.make_query(name, "A", use_edns=0)
    await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)


def _by_upstream(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> dict[str, float]:
    """``name``'s value per ``upstream`` label, keyed by the upstream's port."""
    found = {}
    for (metric, labels), value in samples.items():
        if metric == name and len(labels) == 1 and labels[0][0] == "upstream":
            found[labels[0][1].rsplit(":", 1)[-1]] = value
    return found


def _exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


async def test_route_upstreams_have_metrics(
    upstream: DoqTestUpstream, start_proxy: object, certs: Certs, tmp_path: Path
) -> None:
    servers = [DoqTestUpstream(certs.cert_file, certs.key_file) for _ in range(3)]
    for server in servers:
        await server.start()
    solo, left, right = (str(s.port) for s in servers)
    try:
        metrics = free_port()
        proxy: ProxyProcess = start_proxy(  # type: ignore[operator]
            upstream.port,
            "--route", f"solo.test=quic://127.0.0.1:{solo}",
            "--route", f"pair.test=quic://127.0.0.1:{left},quic://127.0.0.1:{right}",
            # The -u upstream's URL again: a pool of its own, but one name on /metrics.
            "--route", f"same.test=quic://127.0.0.1:{upstream.port}",
            "--metrics-listen", f"127.0.0.1:{metrics}",
        )  # fmt: skip
        names = ["a.test", "x.solo.test", "y.same.test", *(f"n{i}.pair.test" for i in range(6))]
        for name in names:
            await _ask(proxy.port, name)
        samples = await asyncio.to_thread(scrape, metrics)

        handshakes = _by_upstream(samples, "doqproxy_upstream_handshakes_total")
        assert set(handshakes) == {str(upstream.port), solo, left, right}, samples.keys()
        assert handshakes[solo] >= 1 and handshakes[str(upstream.port)] >= 1
        connections = _by_upstream(samples, "doqproxy_upstream_connections")
        assert connections[solo] >= 1
        # The route's group counts what it sent to each member, like the -u group.
        sent = _by_upstream(samples, "doqproxy_upstream_queries_sent_total")
        assert set(sent) == {str(upstream.port), left, right}
        assert sent[left] + sent[right] >= 6 and sent[str(upstream.port)] >= 1
        assert servers[0].seen_names() == ["x.solo.test."]

        # Each series once: a duplicate would make the exposition invalid.
        text = await asyncio.to_thread(_exposition, metrics)
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        assert len(lines) == len(set(lines))
        series = [line.rsplit(" ", 1)[0] for line in lines]
        assert len(series) == len(set(series))
    finally:
        for server in servers:
            await server.stop()
