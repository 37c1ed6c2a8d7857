"""Latency over a link: doqproxy forward → relay (+RTT) → doqproxy serve, from the client's view."""

from __future__ import annotations

import statistics
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .procs import LOOPBACK, BenchError, Child, query


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from ``/metrics``: the sum of each metric over its labels."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            found[name] = found.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return found


@dataclass
class LinkResult:
    rtt_ms: float
    full_handshake_ms: list[float] = field(default_factory=list)
    restart_0rtt_ms: list[float] = field(default_factory=list)
    warm_miss_ms: list[float] = field(default_factory=list)
    early_data_accepted: int = 0
    sessions_resumed: int = 0

    def as_dict(self) -> dict[str, object]:
        def stats(samples: list[float]) -> dict[str, object]:
            return {
                "median": round(statistics.median(samples), 2),
                "min": round(min(samples), 2),
                "max": round(max(samples), 2),
                "n": len(samples),
                "samples": [round(s, 2) for s in samples],
            }

        return {
            "rtt_ms": self.rtt_ms,
            "runs": len(self.restart_0rtt_ms),
            "full_handshake_ms": stats(self.full_handshake_ms),
            "restart_0rtt_ms": stats(self.restart_0rtt_ms),
            "warm_miss_ms": stats(self.warm_miss_ms),
            "restarts_with_early_data_accepted": self.early_data_accepted,
            "restarts_with_session_resumed": self.sessions_resumed,
        }


# start(name, state_dir) -> (child, listen port, metrics port); stop(child)
StartForward = Callable[[str, Path], tuple[Child, int, int | None]]


def ask(port: int, name: str) -> float:
    try:
        rcode, elapsed = query(port, name, timeout=5.0)
    except TimeoutError:
        raise BenchError(f"link test: no answer for {name} within 5 s") from None
    if rcode != "NOERROR":
        raise BenchError(f"link test: {name} answered {rcode}")
    return elapsed


def measure(
    runs: int,
    rtt_ms: float,
    names: list[str],
    state_root: Path,
    start: StartForward,
    stop: Callable[[Child], object],
    warm_per_run: int = 3,
) -> LinkResult:
    """Each run: a fresh state dir, first query (full handshake), warm misses, then a
    restart with the same state dir and its first query (0-RTT with a saved ticket)."""
    result = LinkResult(rtt_ms=rtt_ms)
    position = 0

    def next_name() -> str:
        nonlocal position
        position += 1
        return names[(position - 1) % len(names)]

    for run in range(runs):
        state = state_root / f"state-{run}"
        state.mkdir(parents=True)
        child, port, _ = start("forward-link-cold", state)
        try:
            result.full_handshake_ms.append(ask(port, next_name()))
            for _ in range(warm_per_run):
                result.warm_miss_ms.append(ask(port, next_name()))
        finally:
            stop(child)
        child, port, metrics_port = start("forward-link-restart", state)
        try:
            result.restart_0rtt_ms.append(ask(port, next_name()))
            if metrics_port is not None:
                metrics = scrape(metrics_port)
                accepted = metrics.get("doqproxy_upstream_early_data_accepted_total", 0)
                resumed = metrics.get("doqproxy_upstream_sessions_resumed_total", 0)
                result.early_data_accepted += int(accepted > 0)
                result.sessions_resumed += int(resumed > 0)
        finally:
            stop(child)
    return result
