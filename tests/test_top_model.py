"""``doqproxy top``'s pure part: parsing scrapes, rates from two scrapes, resets, missing families.

The fixtures in tests/top_scrapes/ are real ``/metrics`` text: ``forward-0.1.0.txt``
was captured from ``doqproxy forward --metrics-listen`` after eight queries
(two cache hits, one NXDOMAIN, one SERVFAIL for a reset stream);
``forward-two-upstreams.txt`` is the same with a second upstream and the
families of the metrics contract (several upstreams, fallback, refusals) added by hand.
``forward-up1-two-upstreams.txt`` was captured from the several-upstreams branch
(``up1``, before it had this branch's build info) forwarding to two test upstreams,
the second stopped after the first 60 queries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doqproxy.top import model, scrape, text
from doqproxy.top.scrape import Scrape, ScrapeError

FIXTURES = Path(__file__).parent / "top_scrapes"
ONE = (FIXTURES / "forward-0.1.0.txt").read_text()
TWO = (FIXTURES / "forward-two-upstreams.txt").read_text()
UP1 = (FIXTURES / "forward-up1-two-upstreams.txt").read_text()
STARTED = 1796068031.9662693
UPSTREAM = "quic://127.0.0.1:48002"


def change(body: str, changes: dict[str, float]) -> str:
    """``body`` with the value of each series (written exactly as in the text) replaced."""
    lines = []
    for line in body.splitlines():
        series, _, _ = line.rpartition(" ")
        if series in changes:
            line = f"{series} {changes.pop(series)!r}"
        lines.append(line)
    assert not changes, f"series not in the scrape: {list(changes)}"
    return "\n".join(lines) + "\n"


def parsed(body: str, at: float, wall: float | None = None) -> Scrape:
    return scrape.parse(body, at=at, wall=STARTED + 60.0 + at if wall is None else wall)


QUERIES_A = 'doqproxy_queries_total{qtype="A",rcode="NOERROR",transport="udp"}'
SERVFAIL_A = 'doqproxy_queries_total{qtype="A",rcode="SERVFAIL",transport="udp"}'


def test_parse_a_captured_scrape() -> None:
    got = parsed(ONE, at=5.0, wall=STARTED + 100.0)
    assert got.value("doqproxy_queries_total") == 8
    assert got.value("doqproxy_cache_hits_total") == 2
    assert got.by_label("doqproxy_servfail_total", "ede") == {"23": 1.0}
    assert got.by_label("doqproxy_queries_total", "rcode", transport="tcp") == {"NOERROR": 1.0}
    # Counters, histogram parts and an empty counter family are all counters; gauges are not.
    assert {
        "doqproxy_cache_hits_total",
        "doqproxy_upstream_latency_seconds_count",
        "doqproxy_upstream_connection_closes_total",
    } <= got.counters
    assert "doqproxy_upstream_connections" not in got.counters
    assert got.has("doqproxy_upstream_connection_closes_total")
    assert model.upstream_names(got) == [UPSTREAM]

    snap = model.Monitor("http://x/metrics").update(got)
    assert (snap.version, snap.event_loop, snap.quic_engine) == ("0.1.0", "uvloop", "aioquic")
    assert snap.uptime == pytest.approx(100.0)
    assert (snap.queries, snap.cache_hits, snap.cache_misses, snap.servfail) == (8, 2, 6, 1)
    assert snap.cache_hit_ratio_total == pytest.approx(0.25)
    # One scrape has no rates yet.
    assert snap.qps is None and snap.qps_minute is None and snap.cache_hit_ratio is None
    [row] = snap.upstreams
    assert (row.name, row.connections, row.streams, row.handshakes) == (UPSTREAM, 1, 0, 1)
    assert row.state is None and row.srtt_ms is None and row.last_error is None
    # No per-upstream query counter yet: the latency histogram gives the mean since start.
    assert row.latency_ms == pytest.approx(0.021727137 / 5 * 1000)
    assert [r.name for r in snap.servfail_reasons] == ["Network Error"]


def test_rates_from_two_scrapes_with_a_fake_clock() -> None:
    monitor = model.Monitor("http://x/metrics")
    monitor.update(parsed(ONE, at=100.0))
    later = change(
        ONE,
        {
            QUERIES_A: 5.0 + 200,
            SERVFAIL_A: 1.0 + 4,
            "doqproxy_cache_hits_total": 2.0 + 150,
            "doqproxy_cache_misses_total": 6.0 + 50,
            "doqproxy_cache_prefetches_total": 8.0,
            'doqproxy_servfail_total{ede="23"}': 5.0,
        },
    )
    snap = monitor.update(parsed(later, at=104.0))
    assert snap.queries == 8 + 204
    assert snap.qps == pytest.approx(204 / 4)
    assert snap.qps_minute == pytest.approx(204 / 4)
    assert snap.history == [pytest.approx(51.0)]
    assert snap.cache_hit_ratio == pytest.approx(150 / 200)
    assert snap.prefetches == 8 and snap.prefetch_rate == pytest.approx(2.0)
    assert snap.servfail_rate == pytest.approx(1.0)
    [reason] = snap.servfail_reasons
    assert (reason.code, reason.recent, reason.total) == ("23", 4, 5)
    # The fallback upstream rate: answers timed plus failed queries (none moved here).
    assert snap.upstreams[0].qps == 0.0


def test_the_minute_window_forgets_old_steps() -> None:
    monitor = model.Monitor("http://x/metrics", window=60.0)
    total = 5.0
    snap = monitor.update(parsed(ONE, at=0.0))
    for second in range(1, 91):
        total += 10 if second <= 30 else 2  # 10 q/s for 30 s, then 2 q/s
        snap = monitor.update(parsed(change(ONE, {QUERIES_A: total}), at=float(second)))
    assert len(snap.history) == 60
    assert snap.qps == pytest.approx(2.0)
    assert snap.qps_minute == pytest.approx(2.0)
    assert len(text.sparkline(snap.history)) == 60


def test_a_counter_reset_never_gives_a_negative_rate() -> None:
    monitor = model.Monitor("http://x/metrics")
    monitor.update(parsed(change(ONE, {QUERIES_A: 1000.0}), at=0.0))
    # Same start time but the counter went down (a reset): it grew by its new value.
    snap = monitor.update(parsed(change(ONE, {QUERIES_A: 30.0}), at=1.0))
    assert snap.qps is not None and snap.qps >= 0
    assert snap.qps == pytest.approx(30.0)  # the reset series grew by its new value


def test_a_restarted_forwarder_starts_a_fresh_history() -> None:
    monitor = model.Monitor("http://x/metrics")
    monitor.update(parsed(ONE, at=0.0))
    monitor.update(parsed(change(ONE, {QUERIES_A: 50.0}), at=1.0))
    # A new process, already past the old counts by the time we look again.
    restarted = change(ONE, {QUERIES_A: 70.0, "doqproxy_start_time_seconds": STARTED + 300})
    snap = monitor.update(parsed(restarted, at=2.0))
    assert len(snap.history) == 1
    assert snap.qps == pytest.approx(70 + 3)
    for value in (snap.qps, snap.qps_minute, snap.cache_hit_ratio, snap.servfail_rate):
        assert value is None or value >= 0


def test_missing_families_show_as_unknown() -> None:
    body = (
        "# TYPE doqproxy_resolver_received_total counter\ndoqproxy_resolver_received_total 10.0\n"
    )
    monitor = model.Monitor("http://x/metrics")
    monitor.update(parsed(body, at=0.0))
    snap = monitor.update(parsed(body.replace("10.0", "15.0"), at=1.0))
    assert snap.queries == 15 and snap.qps == pytest.approx(5.0)
    assert snap.version is None and snap.uptime is None
    assert snap.cache_hits is None and snap.cache_hit_ratio is None and snap.servfail is None
    assert snap.in_flight is None and snap.queued is None and snap.upstreams == []
    assert snap.refused is None and snap.fallback_routes == []
    screen = text.render(snap)
    assert "doqproxy ?" in screen and "(no upstream metrics yet)" in screen
    assert "hit ratio - last minute" in screen


def test_several_upstreams_from_the_contract_families() -> None:
    monitor = model.Monitor("http://x/metrics")
    monitor.update(parsed(TWO, at=0.0))
    later = change(
        TWO,
        {
            'doqproxy_upstream_queries_sent_total{upstream="quic://dns-a.test:853"}': 630.0,
            'doqproxy_upstream_queries_sent_total{upstream="quic://dns-b.test:853"}': 210.0,
            'doqproxy_refused_total{reason="ratelimit"}': 8.0,
        },
    )
    snap = monitor.update(parsed(later, at=2.0))
    a, b = snap.upstreams
    assert (a.name, b.name) == ("quic://dns-a.test:853", "quic://dns-b.test:853")
    assert (a.state, b.state) == ("up", "backoff")
    assert a.srtt_ms == pytest.approx(12.3) and b.srtt_ms == pytest.approx(87.1)
    assert (a.qps, b.qps) == (pytest.approx(15.0), pytest.approx(5.0))
    assert (a.share, b.share) == (pytest.approx(0.75), pytest.approx(0.25))
    assert (b.connections, b.streams, b.handshakes) == (2, 1, 4)
    assert b.early_attempted == pytest.approx(0.75) and b.early_accepted == pytest.approx(2 / 3)
    assert a.last_error is None and b.last_error == "connect: connection refused"
    assert b.failures == {"connect": 7, "tls": 3}
    assert (a.queued, snap.queued) == (3, 3)
    cells = text.upstream_cells(b)
    assert cells[:5] == ["quic://dns-b.test:853", "backoff", "87 ms", "5.0", "25.0%"]
    assert cells[-2:] == ["75.0% / 66.7%", "connect: connection refused"]
    assert (snap.refused, snap.refused_rate, snap.fallback_routes) == (13, 3.0, ["corp.example."])
    assert text.load_line(snap).endswith(
        "; refused 3.0/s, 13 in all; fallback active for corp.example."
    )
    # --json is the snapshot itself.
    decoded = json.loads(json.dumps(snap.to_json()))
    assert decoded["upstreams"][1]["state"] == "backoff"


def test_a_real_several_upstreams_scrape() -> None:
    snap = model.Monitor("http://x/metrics").update(parsed(UP1, at=0.0))
    assert snap.version is None and snap.queries == 278 and snap.in_flight == 1
    up, down = snap.upstreams
    assert (up.name, down.name) == ("quic://127.0.0.1:49581", "quic://127.0.0.1:48590")
    assert (up.state, down.state) == ("up", "backoff")
    assert up.srtt_ms == pytest.approx(2.1956, abs=1e-3)
    assert (up.connections, down.connections, up.streams) == (1, 0, 1)
    assert up.last_error is None
    assert down.last_error == "connect: connection failed: Connection refused"
    assert down.failures == {"connect": 2}
    assert snap.queued == 0 and snap.servfail == 0


def test_not_a_forwarder() -> None:
    with pytest.raises(ScrapeError, match="not Prometheus text"):
        scrape.parse("<html>hello</html>\n", at=0.0, wall=0.0)
    other = "# TYPE node_load1 gauge\nnode_load1 0.5\n"
    with pytest.raises(ScrapeError, match="no doqproxy forward metrics"):
        scrape.parse(other, at=0.0, wall=0.0)


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:9153", "http://127.0.0.1:9153/metrics"),
        ("127.0.0.1", "http://127.0.0.1:9153/metrics"),
        ("0.0.0.0:9100", "http://127.0.0.1:9100/metrics"),
        ("[::]:9100", "http://[::1]:9100/metrics"),
        ("[::1]:9100", "http://[::1]:9100/metrics"),
        ("http://10.0.0.1:9153", "http://10.0.0.1:9153/metrics"),
        ("http://10.0.0.1:9153/metrics", "http://10.0.0.1:9153/metrics"),
    ],
)
def test_url_for(given: str, url: str) -> None:
    assert scrape.url_for(given) == url


def test_url_for_rejects_nonsense() -> None:
    with pytest.raises(ScrapeError, match="not an IP address"):
        scrape.url_for("localhost:9153")
    with pytest.raises(ScrapeError, match="only http"):
        scrape.url_for("ftp://127.0.0.1/")
    assert scrape.listen_hint("http://[::1]:9100/metrics") == "[::1]:9100"


def test_sparkline_and_formats() -> None:
    assert text.sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert text.sparkline([0, 0]) == "▁▁"
    assert text.sparkline([]) == ""
    assert text.duration(3 * 86400 + 5 * 3600) == "3d05h"
    assert text.duration(125) == "2m05s"
    assert text.rate(12345.0) == "12.3k" and text.rate(None) == "-"
    assert model.ede_name("22") == "No Reachable Authority"
    assert model.ede_name("none") == "upstream's own" and model.ede_name("9") == "EDE 9"
