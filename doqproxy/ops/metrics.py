"""Prometheus metrics for ``doqproxy forward --metrics-listen`` and ``serve --metrics-listen``.

One custom collector reads the counters that the resolver, cache and pool keep
anyway (plain integers in their stats dataclasses) at scrape time, so metrics
cost nothing per query beyond what :mod:`doqproxy.ops.observers` adds for the
per-(transport, qtype, rcode) counts and the latency histogram. The HTTP server
is prometheus-client's own, on a daemon thread; the collector only reads ints
and copies dicts, both atomic under the GIL.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from doqproxy import __version__
from doqproxy.cache.policy import AnswerCache
from doqproxy.doq.server_rules import DoqServerStats
from doqproxy.frontend.admission import AdmissionStats
from doqproxy.frontend.tcp import TcpStats
from doqproxy.net.addresses import HostPort
from doqproxy.ops.observers import LatencyHistogram, Observations, qtype_label, rcode_label
from doqproxy.ops.process import event_loop_name
from doqproxy.resolver import Resolver
from doqproxy.routing.build import reachable
from doqproxy.upstream import engine
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.group import Member, UpstreamGroup
from doqproxy.upstream.health import Reason, State
from doqproxy.upstream.pool import DoqUpstream, PoolStats

_DOQ_CODES = {
    0x0: "NO_ERROR",
    0x1: "INTERNAL_ERROR",
    0x2: "PROTOCOL_ERROR",
    0x3: "REQUEST_CANCELLED",
    0x4: "EXCESSIVE_LOAD",
    0x5: "UNSPECIFIED_ERROR",
}


@dataclass(slots=True)
class Sources:
    """Where the collector reads from; each is looked up at scrape time, so a reload
    that swaps the upstream is picked up without re-registering."""

    resolver: Callable[[], Resolver]
    upstream: Callable[[], UpstreamGroup]
    latency: Callable[[], dict[str, LatencyHistogram]]
    observations: Observations
    in_flight: Callable[[], int]
    fallbacks: Callable[[], list[Any]] = list
    """The routes' :class:`~doqproxy.upstream.fallback.FallbackUpstream` wrappers."""
    admission: Callable[[], AdmissionStats | None] = lambda: None
    tcp: Callable[[], TcpStats | None] = lambda: None


def counters(
    prefix: str, rows: tuple[tuple[str, int, str], ...], label: tuple[str, str] | None = None
) -> Iterator[Metric]:
    """One counter family per ``(name, value, help)`` row, optionally with one label."""
    for name, value, text in rows:
        metric = CounterMetricFamily(f"{prefix}_{name}", text, labels=[label[0]] if label else None)
        metric.add_metric([label[1]] if label else [], value)
        yield metric


_Named = TypeVar("_Named", Member, DoqUpstream)


def _by_name(items: list[_Named]) -> dict[str, list[_Named]]:
    """``items`` grouped by display name (one series per name), in order."""
    named: dict[str, list[_Named]] = {}
    for item in items:
        named.setdefault(item.name, []).append(item)
    return named


def quic_engine() -> str:
    """The QUIC library the DoQ client runs on (``--quic-engine``)."""
    return engine.NAME


_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b")


def error_label(text: str) -> str:
    """An error text fit for a label: durations ("next attempt in 3.2s") become "Ns",
    so that each new wait is not a new Prometheus series."""
    return _DURATION.sub("Ns", text)[:200]


def close_code_label(code: int) -> str:
    """DoQ application codes by name; QUIC transport / TLS codes as hex."""
    if code in _DOQ_CODES:
        return _DOQ_CODES[code]
    return f"{code:#x}"


class ForwardCollector(Collector):
    """Exposes the forwarder's stats dataclasses as Prometheus metrics."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        # Made on the event loop's thread just after start-up; scrapes run on another.
        self.build = {
            "version": __version__,
            "event_loop": event_loop_name(),
            "quic_engine": quic_engine(),
        }
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "doqproxy_build_info", "Version, event loop and QUIC engine.", labels=list(self.build)
        )
        self.build["quic_engine"] = quic_engine()  # a reload may switch it
        build.add_metric(list(self.build.values()), 1)
        yield build
        started = GaugeMetricFamily(
            "doqproxy_start_time_seconds", "When the forwarder started, in seconds since the epoch."
        )
        started.add_metric([], self.started)
        yield started
        yield from self._queries()
        yield from self._cache(self.sources.resolver().cache)
        members, leaves = self._upstreams()
        yield from self._members(members)
        yield from self._pools([u for u in leaves if isinstance(u, DoqUpstream)])
        yield from self._latency()
        yield from self._fallbacks()
        in_flight = GaugeMetricFamily("doqproxy_in_flight_queries", "Queries being answered now.")
        in_flight.add_metric([], self.sources.in_flight())
        yield in_flight
        yield from self._admission()

    def _admission(self) -> Iterator[Metric]:
        stats = self.sources.admission()
        if stats is not None:
            refused = CounterMetricFamily(
                "doqproxy_refused",
                "Queries not forwarded: outside --allow (acl), RD=0 from off-host (snoop), "
                "over --ratelimit, from a reflection port, or beyond --max-in-flight.",
                labels=["reason"],
            )
            for reason, count in dict(stats.refused).items():
                refused.add_metric([reason], count)
            yield refused
            limited = CounterMetricFamily(
                "doqproxy_ratelimited",
                "UDP queries and error replies over the rate limit: dropped, or slipped (TC=1).",
                labels=["action"],
            )
            for action, count in dict(stats.ratelimited).items():
                limited.add_metric([action], count)
            yield limited
            yield from counters(
                "doqproxy",
                (("any_minimal", stats.any_minimal, "ANY over UDP answered per RFC 8482."),),
            )
        tcp = self.sources.tcp()
        if tcp is not None:
            yield from counters(
                "doqproxy_tcp_connections",
                (
                    ("refused", tcp.refused, "TCP connections refused: no slot free."),
                    ("evicted", tcp.evicted, "Idle TCP connections closed to make room."),
                    ("shed", tcp.shed, "TCP connections closed over the write budget."),
                    ("aged", tcp.aged, "TCP connections closed at the maximum age."),
                ),
            )
            yield from counters(
                "doqproxy_tcp",
                (
                    (
                        "shared_answers",
                        tcp.shared,
                        "Queued TCP answers sharing another client's copy (differing in ID).",
                    ),
                ),
            )

    def _fallbacks(self) -> Iterator[Metric]:
        wrappers = self.sources.fallbacks()
        if not wrappers:
            return
        active = GaugeMetricFamily(
            "doqproxy_fallback_active",
            "1 while a route's traffic goes to its --fallback upstreams.",
            labels=["route"],
        )
        switches = CounterMetricFamily(
            "doqproxy_fallback_switches",
            "Switches between a route's DoQ upstreams and its fallback.",
            labels=["route", "direction"],
        )
        for wrapper in wrappers:
            active.add_metric([wrapper.route], 1 if wrapper.active else 0)
            for direction, count in wrapper.switches.items():
                switches.add_metric([wrapper.route, direction], count)
        yield active
        yield switches

    def _queries(self) -> Iterator[Metric]:
        stats = self.sources.resolver().stats
        answers = CounterMetricFamily(
            "doqproxy_queries",
            "Queries answered, by client transport, query type and response code.",
            labels=["transport", "qtype", "rcode"],
        )
        named: dict[tuple[str, str, str], int] = {}
        for (udp, qtype, rcode), count in dict(self.sources.observations.answers).items():
            key = ("udp" if udp else "tcp", qtype_label(qtype), rcode_label(rcode))
            named[key] = named.get(key, 0) + count
        for labels, count in named.items():
            answers.add_metric(list(labels), count)
        yield answers
        servfails = CounterMetricFamily(
            "doqproxy_servfail",
            "SERVFAIL answers by the EDE INFO-CODE doqproxy added (none: the upstream's own).",
            labels=["ede"],
        )
        for ede, count in dict(stats.servfails).items():
            servfails.add_metric(["none" if ede is None else str(int(ede))], count)
        yield servfails
        yield from counters(
            "doqproxy_resolver",
            (
                ("received", stats.queries, "Queries handed to the resolver."),
                ("dropped", stats.dropped, "Queries dropped without an answer (malformed)."),
                ("rejected", stats.rejected, "Queries refused before the upstream (FORMERR etc.)."),
                (
                    "upstream_errors",
                    stats.upstream_errors,
                    "Queries answered SERVFAIL for an upstream failure.",
                ),
            ),
        )

    def _cache(self, cache: AnswerCache | None) -> Iterator[Metric]:
        if cache is None:
            return
        stats = cache.stats
        yield from counters(
            "doqproxy_cache",
            (
                ("hits", stats.hits, "Answers served fresh from the cache."),
                ("misses", stats.misses, "Lookups that found nothing usable."),
                ("stale", stats.stale, "Answers served stale (RFC 8767)."),
                ("prefetches", stats.prefetches, "Entries refreshed before they expired."),
                ("stored", stats.stored, "Answers stored."),
            ),
        )
        entries = GaugeMetricFamily("doqproxy_cache_entries", "Entries in the cache.")
        entries.add_metric([], len(cache))
        yield entries

    def _pools(self, upstreams: list[DoqUpstream]) -> Iterator[Metric]:
        """The connection pools, each metric family once with a sample per name (a
        family repeated per upstream is not a valid exposition); pools of the same
        name (a route's and -u's) are added up."""
        named = _by_name(upstreams)
        rows: tuple[tuple[str, str, Callable[[PoolStats], int]], ...] = (
            ("connections_opened", "QUIC connections opened.", lambda s: s.connections_opened),
            ("handshakes", "Completed QUIC handshakes.", lambda s: s.handshakes),
            ("sessions_resumed", "Handshakes that resumed a session.",
             lambda s: s.sessions_resumed),
            ("early_data_attempted", "Connections that sent 0-RTT data.",
             lambda s: s.early_data_sent),
            ("early_data_accepted", "0-RTT data the server accepted.",
             lambda s: s.early_data_accepted),
            ("retries", "Queries retried on a fresh connection.", lambda s: s.retries),
            ("connect_failures", "Connections that never came up.", lambda s: s.connect_failures),
        )  # fmt: skip
        for metric, text, value in rows:
            family = CounterMetricFamily(f"doqproxy_upstream_{metric}", text, labels=["upstream"])
            for name, pools in named.items():
                family.add_metric([name], sum(value(u.stats) for u in pools))
            yield family
        closes = CounterMetricFamily(
            "doqproxy_upstream_connection_closes",
            "Upstream connections closed, by error code (DoQ names; QUIC/TLS codes in hex).",
            labels=["upstream", "code"],
        )
        pool = GaugeMetricFamily(
            "doqproxy_upstream_connections", "Open upstream connections.", labels=["upstream"]
        )
        streams = GaugeMetricFamily(
            "doqproxy_upstream_streams_in_flight",
            "Queries waiting on upstream streams.",
            labels=["upstream"],
        )
        for name, pools in named.items():
            by_code: dict[str, int] = {}
            for upstream in pools:
                for code, count in dict(upstream.stats.closes_by_code).items():
                    label = close_code_label(code)
                    by_code[label] = by_code.get(label, 0) + count
            for label, count in by_code.items():
                closes.add_metric([name, label], count)
            connections = [conn for u in pools for conn in u.connections]
            pool.add_metric([name], len(connections))
            streams.add_metric([name], sum(conn.in_flight for conn in connections))
        yield from (closes, pool, streams)

    def _upstreams(self) -> tuple[list[Member], list[Upstream]]:
        """The -u group's members, then those of the routes' groups; the single
        upstreams behind them all (routes and fallbacks included), each once."""
        group = self.sources.upstream()
        members, leaves = reachable(self.sources.resolver().upstream)
        known = {id(m) for m in group.members}
        members = [*group.members, *(m for m in members if id(m) not in known)]
        found = {id(m.upstream) for m in group.members}
        return members, [
            *(m.upstream for m in group.members),
            *(u for u in leaves if id(u) not in found),
        ]

    def _members(self, members: list[Member]) -> Iterator[Metric]:
        """What each group knows per upstream: traffic, health, hedging. The members of
        one name in several groups (-u and a route's) add up their counts; the health
        shown is the first one's (-u's)."""
        named = _by_name(members)
        rows: tuple[tuple[str, str, Callable[[Member], int]], ...] = (
            ("queries_sent", "Queries sent to the upstream (hedges and side trips included).",
             lambda m: m.stats.queries_sent),
            ("answers", "Usable answers (not SERVFAIL/REFUSED) from the upstream.",
             lambda m: m.stats.answers),
            ("hedged", "Queries sent to the upstream because the one before it was late.",
             lambda m: m.stats.hedged),
            ("races_won", "Answers that won while another upstream had the same query.",
             lambda m: m.stats.races_won),
        )  # fmt: skip
        for metric, text, value in rows:
            family = CounterMetricFamily(f"doqproxy_upstream_{metric}", text, labels=["upstream"])
            for name, same in named.items():
                family.add_metric([name], sum(value(m) for m in same))
            yield family
        failures = CounterMetricFamily(
            "doqproxy_upstream_failures",
            "Failed queries by reason (connect, timeout, tls, protocol, servfail, refused).",
            labels=["upstream", "reason"],
        )
        srtt = GaugeMetricFamily(
            "doqproxy_upstream_srtt_seconds",
            "Smoothed RTT from answers and handshakes (absent until measured).",
            labels=["upstream"],
        )
        state = GaugeMetricFamily(
            "doqproxy_upstream_state",
            "1 for the upstream's current health state.",
            labels=["upstream", "state"],
        )
        last_error = GaugeMetricFamily(
            "doqproxy_upstream_last_error_info",
            "The upstream's last error (absent when there is none).",
            labels=["upstream", "error"],
        )
        queued = GaugeMetricFamily(
            "doqproxy_upstream_queued_queries",
            "Queries waiting inside the upstream's pool for a connection.",
            labels=["upstream"],
        )
        for name, same in named.items():
            for reason in Reason:
                count = sum(m.health.failure_count(reason) for m in same)
                failures.add_metric([name, str(reason)], count)
            health = same[0].health
            if health.srtt is not None:
                srtt.add_metric([name], health.srtt)
            for each in State:
                state.add_metric([name, str(each)], float(health.state is each))
            if health.last_error:
                last_error.add_metric([name, error_label(health.last_error)], 1)
            # A pool shared by several groups' members is counted once.
            pools = {id(m.upstream): m for m in same}.values()
            queued.add_metric([name], sum(m.queued for m in pools))
        yield from (failures, srtt, state, last_error, queued)

    def _latency(self) -> Iterator[Metric]:
        histograms = dict(self.sources.latency())
        latency = HistogramMetricFamily(
            "doqproxy_upstream_latency_seconds",
            "Time from sending a query upstream to its answer.",
            labels=["upstream"],
        )
        errors = CounterMetricFamily(
            "doqproxy_upstream_query_errors",
            "Upstream queries that failed (timeouts are not counted here).",
            labels=["upstream"],
        )
        for name, histogram in histograms.items():
            latency.add_metric([name], histogram.cumulative(), histogram.total)
            errors.add_metric([name], histogram.errors)
        yield latency
        yield errors


class ServeCollector(Collector):
    """Exposes ``doqproxy serve``'s :class:`DoqServerStats` and its resolver's counters."""

    def __init__(self, stats: DoqServerStats, resolver: Resolver) -> None:
        self.stats = stats
        self.resolver = resolver

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for direction, counts in (("sent", stats.closes_sent), ("received", stats.closes_received)):
            closes = CounterMetricFamily(
                f"doqproxy_serve_connection_closes_{direction}",
                f"DoQ connection closes {direction}, by DoQ error code (like CoreDNS's "
                "quic_responses_total).",
                labels=["code"],
            )
            for code, count in dict(counts).items():
                closes.add_metric([close_code_label(code)], count)
            yield closes
        transport = CounterMetricFamily(
            "doqproxy_serve_transport_closes",
            "Connections closed by the QUIC transport (TLS alerts, refusals), by code.",
            labels=["code"],
        )
        for code, count in dict(stats.transport_closes).items():
            transport.add_metric([f"{code:#x}"], count)
        yield transport
        yield from counters(
            "doqproxy_serve",
            (
                ("connections", stats.connections, "Connections accepted."),
                ("refused", stats.refused, "Connections refused before any TLS work (caps)."),
                ("retries", stats.retries, "Retry packets sent to validate client addresses."),
                (
                    "handshake_timeouts",
                    stats.handshake_timeouts,
                    "Connections closed at --handshake-timeout.",
                ),
                ("refused_queries", stats.refused_queries, "Queries refused (0-RTT, NOTIFY)."),
                ("queries", stats.streams, "Queries read completely."),
                ("early_queries", stats.early_queries, "Queries that arrived as 0-RTT data."),
                ("too_early", stats.too_early, "0-RTT queries refused with EDE 26."),
                ("stream_timeouts", stats.stream_timeouts, "Streams reset at the read deadline."),
                ("idle_timeouts", stats.idle_timeouts, "Connections closed by the idle timeout."),
                (
                    "upstream_errors",
                    self.resolver.stats.upstream_errors,
                    "SERVFAIL for the backend.",
                ),
            ),
        )
        active = GaugeMetricFamily("doqproxy_serve_active_connections", "Open connections.")
        active.add_metric([], stats.active)
        yield active
        handshaking = GaugeMetricFamily("doqproxy_serve_handshakes", "Handshakes under way.")
        handshaking.add_metric([], stats.handshaking)
        yield handshaking


class MetricsServer:
    """prometheus-client's HTTP server for one registry holding one collector."""

    def __init__(self, address: HostPort, collector: Collector) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve on a daemon thread; raises OSError when it cannot bind."""
        server, thread = start_http_server(
            self.address.port, addr=self.address.host, registry=self.registry
        )
        self._server, self._thread = server, thread
        host, port = server.socket.getsockname()[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
