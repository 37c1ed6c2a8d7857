"""The miss path per QUIC engine: CPU per miss, datagrams per query each way, q/s.

dnsperf → ``doqproxy forward --no-cache`` (once per installed engine) → ``doqproxy
serve``, then the bare clients (aioquic, and qh3 when installed) against the same
serve, one at a time in the same run. CPU per query is the process's utime+stime
over the run divided by the answers; the forward's datagrams come from its SIGUSR1
summary line, the bare clients count their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import dnsperf, report
from .procs import BenchError, Child, cpu_seconds

ENGINES = ("aioquic", "qh3")


def installed_engines() -> list[str]:
    return [name for name in ENGINES if importlib.util.find_spec(name) is not None]


def datagram_counts(child: Child) -> tuple[int, int] | None:
    """Datagrams out and in so far, from the forward's SIGUSR1 summary line."""
    before = len(re.findall(r"datagrams out", child.log.read_text(errors="replace")))
    os.kill(child.pid, signal.SIGUSR1)
    for _ in range(50):
        found = re.findall(r"datagrams out (\d+), in (\d+)", child.log.read_text(errors="replace"))
        if len(found) > before:
            return int(found[-1][0]), int(found[-1][1])
        time.sleep(0.1)
    return None


def forward_case(
    child: Child,
    port: int,
    run: Callable[[int, str], dnsperf.PerfResult],
    label: str,
) -> dict[str, Any]:
    """Measure one running forward: warm it, then one timed dnsperf run."""
    warm = run(port, f"{label}-warm")
    if not warm.all_noerror:
        raise BenchError(f"{label} warm-up: {warm.rcode_text()}")
    counts0 = datagram_counts(child)
    cpu0 = cpu_seconds(child.pid)
    result = run(port, label)
    cpu = cpu_seconds(child.pid) - cpu0
    counts1 = datagram_counts(child)
    entry = report.perf_entry(result)
    answered = max(1, result.completed)
    entry["cpu_us_per_query"] = round(1e6 * cpu / answered, 1)
    if counts0 is not None and counts1 is not None:
        entry["datagrams_up_per_query"] = round((counts1[0] - counts0[0]) / answered, 3)
        entry["datagrams_down_per_query"] = round((counts1[1] - counts0[1]) / answered, 3)
    return entry


def floor(installed: list[str], queries: int) -> list[dict[str, Any]]:
    """:mod:`bench.engine_floor` in a fresh process: each engine's client CPU per
    query with no sockets, at 1, 4 and 16 queries per packet-building turn."""
    argv = [sys.executable, "-m", "bench.engine_floor", "--queries", str(queries)]
    for engine in installed:
        argv += ["--engine", engine]
    for batch in (1, 4, 16):
        argv += ["--batch", str(batch)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(f"engine floor failed: {done.stderr.strip()[-500:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def default_engine() -> str:
    """The engine ``doqproxy forward`` uses when none is named."""
    done = subprocess.run(
        [sys.executable, "-c", "from doqproxy.upstream import engine; print(engine.NAME)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def pipeline(queries: int, *, cache: bool = False) -> dict[str, Any]:
    """:mod:`bench.pipeline` in a fresh process: doqproxy's own Python per miss."""
    argv = [sys.executable, "-m", "bench.pipeline", "--queries", str(queries)]
    if cache:
        argv.append("--cache")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(f"pipeline measurement failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
