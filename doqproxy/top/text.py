"""Formatting shared by the live view and ``--once``, and the plain-text snapshot itself."""

from __future__ import annotations

from collections.abc import Sequence

from doqproxy.top.model import Snapshot, UpstreamRow

BARS = "▁▂▃▄▅▆▇█"

UPSTREAM_COLUMNS = (
    "upstream", "state", "rtt", "q/s", "share", "conns", "streams", "handshakes", "0-RTT try/ok",
    "last error",
)  # fmt: skip


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """The last ``width`` values as bars, scaled to the largest."""
    values = list(values)[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        return BARS[0] * len(values)
    last = len(BARS) - 1
    return "".join(BARS[min(last, round(value / top * last))] for value in values)


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def count(value: int | None) -> str:
    return "-" if value is None else str(value)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%" if value < 1 else "100%"


def millis(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def header(snap: Snapshot) -> str:
    parts = [
        f"doqproxy {snap.version or '?'}",
        f"up {duration(snap.uptime)}",
        f"loop {snap.event_loop or '-'}",
        f"quic {snap.quic_engine or '-'}",
        snap.url,
    ]
    return "  ".join(parts)


def queries_line(snap: Snapshot) -> str:
    return (
        f"queries   {rate(snap.qps)}/s now, {rate(snap.qps_minute)}/s last minute, "
        f"{count(snap.queries)} in all"
    )


def history_line(snap: Snapshot) -> str:
    return f"last 60s  {sparkline(snap.history) or '-'}"


def cache_line(snap: Snapshot) -> str:
    return (
        f"cache     hit ratio {percent(snap.cache_hit_ratio)} last minute, "
        f"{percent(snap.cache_hit_ratio_total)} in all; stale answers {count(snap.stale)} "
        f"({rate(snap.stale_rate)}/s); prefetches {count(snap.prefetches)} "
        f"({rate(snap.prefetch_rate)}/s)"
    )


def servfail_line(snap: Snapshot) -> str:
    reasons = ", ".join(
        f"{r.code} {r.name}: {r.total}" + (f" ({r.recent} last minute)" if r.recent else "")
        for r in snap.servfail_reasons
    )
    return f"servfail  {rate(snap.servfail_rate)}/s, {count(snap.servfail)} in all" + (
        f"; EDE {reasons}" if reasons else ""
    )


def load_line(snap: Snapshot) -> str:
    line = f"load      {count(snap.in_flight)} queries in flight, {count(snap.queued)} queued"
    if snap.refused is not None:
        line += f"; refused {rate(snap.refused_rate)}/s, {snap.refused} in all"
    if snap.fallback_routes:
        line += f"; fallback active for {', '.join(snap.fallback_routes)}"
    return line


def early(row: UpstreamRow) -> str:
    if row.early_attempted is None:
        return "-"
    return f"{percent(row.early_attempted)} / {percent(row.early_accepted)}"


def upstream_cells(row: UpstreamRow) -> list[str]:
    """The cells of one upstream row, in :data:`UPSTREAM_COLUMNS` order."""
    rtt = millis(row.srtt_ms) if row.srtt_ms is not None else millis(row.latency_ms)
    return [
        row.name,
        row.state or "-",
        rtt,
        rate(row.qps),
        percent(row.share),
        count(row.connections),
        count(row.streams),
        count(row.handshakes),
        early(row),
        row.last_error or "-",
    ]


def render(snap: Snapshot) -> str:
    """One snapshot as plain text (``doqproxy top --once``)."""
    lines = [
        header(snap),
        queries_line(snap),
        history_line(snap),
        cache_line(snap),
        servfail_line(snap),
        load_line(snap),
        "",
    ]
    rows = [list(UPSTREAM_COLUMNS), *(upstream_cells(row) for row in snap.upstreams)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(UPSTREAM_COLUMNS))]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not snap.upstreams:
        lines.append("(no upstream metrics yet)")
    return "\n".join(lines)
