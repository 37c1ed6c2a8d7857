"""From successive scrapes to what ``doqproxy top`` shows: rates, ratios and a minute of history.

Every rate is the difference between two scrapes divided by the time between
them (:func:`counter_deltas`), so the forwarder does no work per query for this
view. A counter that goes down, or a new ``doqproxy_start_time_seconds``, means
the forwarder restarted: its new value is then the whole difference, never a
negative rate. A family the forwarder does not export shows as ``None`` ("-"),
and rows for upstreams appear as soon as their series do.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from doqproxy.dns.ede import Ede
from doqproxy.top.scrape import Labels, Scrape

WINDOW = 60.0
"""Seconds of history kept for the "last minute" figures and the sparkline."""

_UPSTREAM_PREFIX = "doqproxy_upstream_"


@dataclass(frozen=True, slots=True)
class Step:
    """What the counters did between two consecutive scrapes."""

    at: float
    """When the later scrape was taken (monotonic)."""
    seconds: float
    deltas: Mapping[str, Mapping[Labels, float]]
    """Growth of each counter series, by sample name and labels."""


def restarted(before: Scrape, after: Scrape) -> bool:
    """True when ``after`` comes from a different forwarder process than ``before``."""
    name = "doqproxy_start_time_seconds"
    return before.value(name) != after.value(name)


def counter_deltas(before: Scrape, after: Scrape) -> dict[str, dict[Labels, float]]:
    """How much every counter series grew from ``before`` to ``after``; never negative.

    A series that is new in ``after`` grew from zero (labels appear with their
    first event); a series that shrank was reset, so it grew by its new value.
    """
    fresh = restarted(before, after)
    out: dict[str, dict[Labels, float]] = {}
    for name in after.counters:
        old_series: Mapping[Labels, float] = {} if fresh else before.series(name)
        grown = out[name] = {}
        for labels, value in after.series(name).items():
            old = old_series.get(labels, 0.0)
            grown[labels] = value - old if value >= old else value
    return out


def _matches(labels: Labels, where: Mapping[str, str]) -> bool:
    found = dict(labels)
    return all(found.get(key) == value for key, value in where.items())


class Window:
    """Sums of counter growth over the steps of the last minute."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    @staticmethod
    def grown(step: Step, name: str, where: Mapping[str, str]) -> float:
        return sum(
            delta
            for labels, delta in step.deltas.get(name, {}).items()
            if not where or _matches(labels, where)
        )

    def count(self, name: str, **where: str) -> float:
        """Growth of ``name`` (series matching ``where``) over the whole window."""
        return sum(self.grown(step, name, where) for step in self.steps)

    def rate(self, name: str, **where: str) -> float | None:
        """Per second over the whole window; ``None`` before the second scrape."""
        seconds = self.seconds
        return self.count(name, **where) / seconds if seconds > 0 else None

    def rate_now(self, name: str, **where: str) -> float | None:
        """Per second over the last step only."""
        if not self.steps:
            return None
        step = self.steps[-1]
        return self.grown(step, name, where) / step.seconds

    def history(self, name: str, **where: str) -> list[float]:
        """The per-second rate of each step, oldest first."""
        return [self.grown(step, name, where) / step.seconds for step in self.steps]


@dataclass(slots=True)
class UpstreamRow:
    """One upstream, as far as the forwarder's metrics tell."""

    name: str
    state: str | None = None
    """up, backoff, probing or fallback; ``None`` when not exported."""
    srtt_ms: float | None = None
    latency_ms: float | None = None
    """Mean upstream latency over the last minute, from the latency histogram."""
    qps: float | None = None
    share: float | None = None
    """This upstream's part of all upstream queries in the last step."""
    connections: int | None = None
    streams: int | None = None
    queued: int | None = None
    handshakes: int | None = None
    early_attempted: float | None = None
    """Share of handshakes that sent 0-RTT data."""
    early_accepted: float | None = None
    """Share of 0-RTT attempts the server accepted."""
    failures: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None


@dataclass(slots=True)
class EdeCount:
    """SERVFAILs with one Extended DNS Error code."""

    code: str
    """The INFO-CODE in decimal, or ``none``."""
    name: str
    recent: int
    """In the last minute."""
    total: int


@dataclass(slots=True)
class Snapshot:
    """Everything one frame of ``doqproxy top`` shows (``--json`` prints it as is)."""

    url: str
    wall: float
    version: str | None = None
    event_loop: str | None = None
    quic_engine: str | None = None
    uptime: float | None = None
    queries: int | None = None
    qps: float | None = None
    qps_minute: float | None = None
    history: list[float] = field(default_factory=list)
    """Queries per second of each step in the last minute, oldest first."""
    cache_hits: int | None = None
    cache_misses: int | None = None
    cache_hit_ratio: float | None = None
    """Over the last minute."""
    cache_hit_ratio_total: float | None = None
    stale: int | None = None
    stale_rate: float | None = None
    prefetches: int | None = None
    prefetch_rate: float | None = None
    servfail: int | None = None
    servfail_rate: float | None = None
    servfail_reasons: list[EdeCount] = field(default_factory=list)
    in_flight: int | None = None
    queued: int | None = None
    refused: int | None = None
    """Queries refused before the resolver (ACL, rate limit, ...), where exported."""
    refused_rate: float | None = None
    fallback_routes: list[str] = field(default_factory=list)
    """Routes answering from their fallback upstreams now."""
    upstreams: list[UpstreamRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Monitor:
    """Keeps the last scrape and a minute of steps; :meth:`update` makes each frame."""

    def __init__(self, url: str, window: float = WINDOW) -> None:
        self.url = url
        self.window = window
        self.last: Scrape | None = None
        self.steps: deque[Step] = deque()

    def update(self, scrape: Scrape) -> Snapshot:
        last = self.last
        if last is not None:
            if restarted(last, scrape):
                self.steps.clear()
            seconds = scrape.at - last.at
            if seconds > 0:
                self.steps.append(Step(scrape.at, seconds, counter_deltas(last, scrape)))
        self.last = scrape
        while self.steps and self.steps[0].at <= scrape.at - self.window:
            self.steps.popleft()
        return snapshot(self.url, scrape, Window(self.steps))


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def ede_name(code: str) -> str:
    """A readable name for an EDE INFO-CODE label."""
    if code == "none":
        return "upstream's own"
    try:
        return Ede(int(code)).name.replace("_", " ").title()
    except ValueError:
        return f"EDE {code}"


def snapshot(url: str, scrape: Scrape, window: Window) -> Snapshot:
    """The frame for ``scrape``, with rates from ``window``."""
    snap = Snapshot(url=url, wall=scrape.wall)
    for labels in scrape.series("doqproxy_build_info"):
        info = dict(labels)
        snap.version = info.get("version")
        snap.event_loop = info.get("event_loop")
        snap.quic_engine = info.get("quic_engine")
    started = scrape.value("doqproxy_start_time_seconds")
    if started is not None:
        snap.uptime = max(0.0, scrape.wall - started)
    queries = "doqproxy_queries_total"
    if not scrape.has(queries):
        queries = "doqproxy_resolver_received_total"
    if scrape.has(queries):
        snap.queries = _int(scrape.value(queries))
        snap.qps = window.rate_now(queries)
        snap.qps_minute = window.rate(queries)
        snap.history = window.history(queries)
    _cache(snap, scrape, window)
    _servfail(snap, scrape, window)
    snap.in_flight = _int(scrape.value("doqproxy_in_flight_queries"))
    snap.queued = _int(scrape.value("doqproxy_upstream_queued_queries"))
    if scrape.has("doqproxy_refused_total"):
        snap.refused = _int(scrape.value("doqproxy_refused_total"))
        snap.refused_rate = window.rate_now("doqproxy_refused_total")
    active = scrape.by_label("doqproxy_fallback_active", "route")
    snap.fallback_routes = [route for route, value in active.items() if value >= 1]
    snap.upstreams = [_upstream(name, scrape, window) for name in upstream_names(scrape)]
    total = sum(row.qps or 0.0 for row in snap.upstreams)
    for row in snap.upstreams:
        if row.qps is not None:
            row.share = _ratio(row.qps, total)
    return snap


def _cache(snap: Snapshot, scrape: Scrape, window: Window) -> None:
    hits, misses = "doqproxy_cache_hits_total", "doqproxy_cache_misses_total"
    if scrape.has(hits) and scrape.has(misses):
        snap.cache_hits = _int(scrape.value(hits))
        snap.cache_misses = _int(scrape.value(misses))
        recent_hits = window.count(hits)
        snap.cache_hit_ratio = _ratio(recent_hits, recent_hits + window.count(misses))
        snap.cache_hit_ratio_total = _ratio(
            snap.cache_hits or 0, (snap.cache_hits or 0) + (snap.cache_misses or 0)
        )
    if scrape.has("doqproxy_cache_stale_total"):
        snap.stale = _int(scrape.value("doqproxy_cache_stale_total"))
        snap.stale_rate = window.rate("doqproxy_cache_stale_total")
    if scrape.has("doqproxy_cache_prefetches_total"):
        snap.prefetches = _int(scrape.value("doqproxy_cache_prefetches_total"))
        snap.prefetch_rate = window.rate("doqproxy_cache_prefetches_total")


def _servfail(snap: Snapshot, scrape: Scrape, window: Window) -> None:
    by_ede = "doqproxy_servfail_total"
    if scrape.has("doqproxy_queries_total"):
        snap.servfail = _int(
            sum(scrape.by_label("doqproxy_queries_total", "rcode", rcode="SERVFAIL").values())
        )
        snap.servfail_rate = window.rate_now("doqproxy_queries_total", rcode="SERVFAIL")
    elif scrape.has(by_ede):
        snap.servfail = _int(scrape.value(by_ede))
        snap.servfail_rate = window.rate_now(by_ede)
    reasons = [
        EdeCount(code, ede_name(code), round(window.count(by_ede, ede=code)), round(total))
        for code, total in scrape.by_label(by_ede, "ede").items()
        if total > 0
    ]
    reasons.sort(key=lambda r: (-r.recent, -r.total, r.code))
    snap.servfail_reasons = reasons[:3]


def upstream_names(scrape: Scrape) -> list[str]:
    """Every ``upstream`` label on a ``doqproxy_upstream_*`` series, in order of appearance."""
    names: dict[str, None] = {}
    for sample, series in scrape.values.items():
        if sample.startswith(_UPSTREAM_PREFIX):
            for labels in series:
                for key, value in labels:
                    if key == "upstream":
                        names.setdefault(value)
    return list(names)


def _upstream(name: str, scrape: Scrape, window: Window) -> UpstreamRow:
    row = UpstreamRow(name)

    def gauge(metric: str) -> float | None:
        sample = _UPSTREAM_PREFIX + metric
        if not scrape.has(sample):
            return None
        return scrape.by_label(sample, "upstream").get(name)

    for state, value in scrape.by_label(_UPSTREAM_PREFIX + "state", "state", upstream=name).items():
        if value >= 1:
            row.state = state
    srtt = gauge("srtt_seconds")
    row.srtt_ms = None if srtt is None else srtt * 1000.0
    latency, answered = (
        _UPSTREAM_PREFIX + "latency_seconds_sum",
        _UPSTREAM_PREFIX + "latency_seconds_count",
    )
    row.latency_ms = _ratio(
        window.count(latency, upstream=name) * 1000.0, window.count(answered, upstream=name)
    )
    if row.latency_ms is None:  # nothing answered lately: the mean since start
        row.latency_ms = _ratio(
            (gauge("latency_seconds_sum") or 0.0) * 1000.0, gauge("latency_seconds_count") or 0.0
        )
    sent = _UPSTREAM_PREFIX + "queries_sent_total"
    if scrape.has(sent):
        row.qps = window.rate_now(sent, upstream=name)
    elif scrape.has(answered):
        # Before per-upstream query counts: answers timed plus queries that failed.
        now = [
            window.rate_now(answered, upstream=name),
            window.rate_now(_UPSTREAM_PREFIX + "query_errors_total", upstream=name),
        ]
        row.qps = None if now[0] is None else sum(v or 0.0 for v in now)
    row.connections = _int(gauge("connections"))
    row.streams = _int(gauge("streams_in_flight"))
    row.queued = _int(gauge("queued_queries"))
    row.handshakes = _int(gauge("handshakes_total"))
    attempted, accepted = gauge("early_data_attempted_total"), gauge("early_data_accepted_total")
    if row.handshakes is not None and attempted is not None:
        row.early_attempted = _ratio(attempted, row.handshakes)
        if accepted is not None:
            row.early_accepted = _ratio(accepted, attempted)
    failures = scrape.by_label(_UPSTREAM_PREFIX + "failures_total", "reason", upstream=name)
    row.failures = {reason: round(count) for reason, count in failures.items() if count > 0}
    for error, value in scrape.by_label(
        _UPSTREAM_PREFIX + "last_error_info", "error", upstream=name
    ).items():
        if value >= 1:
            row.last_error = error
    return row
