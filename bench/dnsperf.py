"""Run dnsperf and read its statistics, including per-query latencies with ``-v``."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .peers import which
from .procs import LOOPBACK, BenchError


@dataclass
class PerfResult:
    sent: int
    completed: int
    lost: int
    rcodes: dict[str, int]
    qps: float
    avg_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def all_noerror(self) -> bool:
        """Every query sent was answered, and every answer was NOERROR."""
        return (
            self.sent > 0
            and self.lost == 0
            and self.rcodes.get("NOERROR", 0) == self.completed == self.sent
        )

    def rcode_text(self) -> str:
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.rcodes.items()))
        return f"{codes or 'no answers'}; lost {self.lost} of {self.sent}"

    def percentile(self, p: float) -> float:
        """The p-th percentile (nearest rank) of the per-query latencies, in ms."""
        if not self.latencies_ms:
            raise BenchError("no per-query latencies (dnsperf ran without -v)")
        ordered = sorted(self.latencies_ms)
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if not match:
        raise BenchError(f"dnsperf output has no {pattern!r}:\n{text[-1500:]}")
    return float(match.group(1))


def parse(text: str) -> PerfResult:
    rcodes: dict[str, int] = {}
    line = re.search(r"Response codes:([^\n]*)", text)
    if line:
        for code, count in re.findall(r"([A-Z]+) (\d+) \(", line.group(1)):
            rcodes[code] = int(count)
    latencies = [float(m) * 1000 for m in re.findall(r"^> [A-Z]+ \S+ \S+ ([0-9.]+)$", text, re.M)]
    return PerfResult(
        sent=int(_number(r"Queries sent:\s+(\d+)", text)),
        completed=int(_number(r"Queries completed:\s+(\d+)", text)),
        lost=int(_number(r"Queries lost:\s+(\d+)", text)),
        rcodes=rcodes,
        qps=_number(r"Queries per second:\s+([0-9.]+)", text),
        avg_ms=_number(r"Average Latency \(s\):\s+([0-9.]+)", text) * 1000,
        latencies_ms=latencies,
    )


def run(
    port: int,
    datafile: Path,
    out: Path,
    *,
    seconds: float | None = None,
    runs: int | None = None,
    clients: int = 4,
    threads: int = 1,
    qps_limit: int | None = None,
    outstanding: int | None = None,
    timeout: float = 5.0,
    verbose: bool = False,
) -> PerfResult:
    """One dnsperf run against ``LOOPBACK:port``; its output is kept in ``out``."""
    argv = [which("dnsperf") or "dnsperf", "-s", LOOPBACK, "-p", str(port), "-d", str(datafile)]
    argv += ["-c", str(clients), "-T", str(threads), "-t", str(timeout)]
    if seconds is not None:
        argv += ["-l", f"{seconds:g}"]
    if runs is not None:
        argv += ["-n", str(runs)]
    if qps_limit is not None:
        argv += ["-Q", str(qps_limit)]
    if outstanding is not None:
        argv += ["-q", str(outstanding)]
    if verbose:
        argv.append("-v")
    limit = (seconds or 0) + timeout + 120
    with open(out, "wb") as handle:
        done = subprocess.run(
            argv, stdout=handle, stderr=subprocess.STDOUT, timeout=limit, check=False
        )
    text = out.read_text(errors="replace")
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}:\n{text[-1500:]}")
    return parse(text)
