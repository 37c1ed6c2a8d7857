"""The benchmark run: set up the backends, measure every case in turn, report.

Usage: ``python -m bench [--quick] [--output PATH] [--no-install]``. The markdown
report goes to stdout, progress to stderr, the figures to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import dnsperf, engines, failover, link, peers, profile, report
from .procs import (
    LOOPBACK,
    REPO,
    SERVER_NAME,
    BenchError,
    Child,
    Children,
    Notify,
    cpu_seconds,
    doqproxy_argv,
    free_port,
    make_certificates,
    rss_kib,
    wait_answering,
    wait_log,
)

RESULTS = REPO / "bench" / "results" / "latest.json"
CASES = ("cache_hit", "miss_path", "engines", "link", "failover", "memory")


@dataclass(frozen=True)
class Plan:
    quick: bool
    hit_seconds: float
    hit_rounds: int
    p99_seconds: float
    p99_qps: int
    miss_seconds: float
    profile_seconds: float
    link_runs: int
    link_rtt_ms: float
    hit_names: int
    memory_names: int
    failover_seconds: float = 15.0
    failover_qps: int = 500

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1, 1, 1, 10_000, 1, 1, 2, 50, 1000, 2000, 3.0)
        return cls(False, 10, 2, 5, 10_000, 8, 5, 10, 50, 1000, 100_000, 15.0)


def progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, plan: Plan, workdir: Path, children: Children) -> None:
        self.plan = plan
        self.workdir = workdir
        self.children = children
        self.notes: list[str] = []
        self.ca, self.cert, self.key = make_certificates(workdir)
        help_text = subprocess.run(
            doqproxy_argv("forward", "--help"), capture_output=True, text=True, check=True
        ).stdout
        self.forward_caches = "--no-cache" in help_text
        self.forward_metrics = "--metrics-listen" in help_text
        self.hit_file = peers.write_queries(workdir / "hit.txt", peers.hit_names(plan.hit_names))
        self.memory_file = peers.write_queries(
            workdir / "memory.txt", peers.memory_names(plan.memory_names)
        )
        self.doq_port = 0
        self.plain_port = 0
        self.forwards = 0

    # -- processes -------------------------------------------------------------------

    def start_backends(self) -> None:
        zone = self.workdir / "bench.zone"
        peers.write_zone(zone, self.plan.hit_names, self.plan.memory_names)
        serve = self.children.start(
            "serve",
            doqproxy_argv(
                "serve", "-v", "-l", f"{LOOPBACK}:0", "--cert", str(self.cert),
                "--key", str(self.key), "--zone", str(zone),
            ),
        )  # fmt: skip
        conf = peers.write_unbound_backend(
            self.workdir / "unbound-backend", free_port(), self.plan.hit_names
        )
        self.plain_port = int(conf.read_text().split("port: ", 1)[1].split()[0])
        backend = self.children.start("unbound-backend", peers.unbound_argv(conf))
        self.doq_port = int(wait_log(serve, r"listening on quic://[\d.]+:(\d+)", 60)[1])
        wait_answering(backend, self.plain_port, "n0.bench.test")
        self.serve = serve

    def start_forward(
        self,
        name: str,
        upstream_port: int | list[int],
        state: Path,
        *,
        cache: bool = True,
        metrics: bool = False,
        extra: tuple[str, ...] = (),
    ) -> tuple[Child, int, int | None]:
        """Start ``doqproxy forward``; with ``metrics`` also its Prometheus endpoint, which
        adds per-query bookkeeping, so throughput runs go without it."""
        self.forwards += 1
        port = free_port()
        notify = Notify(self.workdir / f"notify-{self.forwards}")
        ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
        upstreams = [arg for p in ports for arg in ("-u", f"quic://{LOOPBACK}:{p}")]
        argv = doqproxy_argv(
            "forward", "-l", f"{LOOPBACK}:{port}", *upstreams,
            "--tls-ca-file", str(self.ca), "--tls-server-name", SERVER_NAME,
            "--state-dir", str(state), *extra,
        )  # fmt: skip
        if not cache and self.forward_caches:
            argv.append("--no-cache")
        metrics_port = None
        if metrics and self.forward_metrics:
            metrics_port = free_port()
            argv += ["--metrics-listen", f"{LOOPBACK}:{metrics_port}"]
        try:
            child = self.children.start(name, argv, env={"NOTIFY_SOCKET": str(notify.path)})
            notify.wait_ready(child)
        finally:
            notify.close()
        return child, port, metrics_port

    def perf(self, port: int, label: str, **options: Any) -> dnsperf.PerfResult:
        out = self.workdir / f"dnsperf-{label}.txt"
        return dnsperf.run(port, options.pop("datafile", self.hit_file), out, **options)

    # -- cases -----------------------------------------------------------------------

    def start_peer(self, peer: str) -> tuple[Child, int]:
        if peer == "doqproxy":
            child, port, _ = self.start_forward("forward-hit", self.doq_port, self.state())
            return child, port
        port = free_port()
        if peer == "unbound":
            conf = peers.write_unbound_peer(self.workdir / "unbound-peer", port, self.plain_port)
            child = self.children.start("unbound-peer", peers.unbound_argv(conf))
        else:
            child = self.children.start("dnsmasq", peers.dnsmasq_argv(port, self.plain_port))
        wait_answering(child, port, "n0.bench.test")
        return child, port

    def cache_hit(self, spy: str | None) -> dict[str, Any]:
        """Warm cache, UDP, dnsperf -c 4 -T 1: doqproxy forward, Unbound, dnsmasq.

        All three run at once but are measured one at a time, in interleaved rounds; the
        best round counts, so that a burst of other work on the machine hurts less.
        """
        plan = self.plan
        names = ("doqproxy", "unbound", "dnsmasq")
        started: dict[str, tuple[Child, int]] = {}
        rounds: dict[str, list[tuple[dnsperf.PerfResult, float]]] = {n: [] for n in names}
        paced: dict[str, dnsperf.PerfResult] = {}
        found: dict[str, Any] = {}
        try:
            for peer in names:
                started[peer] = self.start_peer(peer)
                warm = self.perf(started[peer][1], f"{peer}-warm", runs=1, clients=4)
                if not warm.all_noerror:
                    raise BenchError(f"{peer} warm-up: {warm.rcode_text()}")
            for number in range(plan.hit_rounds):
                for peer in names:
                    progress(f"cache hit: {peer}, round {number + 1} of {plan.hit_rounds}")
                    child, port = started[peer]
                    cpu0, t0 = cpu_seconds(child.pid), time.monotonic()
                    run = self.perf(port, f"{peer}-hit-{number}", seconds=plan.hit_seconds)
                    cpu = 100 * (cpu_seconds(child.pid) - cpu0) / (time.monotonic() - t0)
                    rounds[peer].append((run, cpu))
            for peer in names:
                progress(f"cache hit: {peer} paced at {plan.p99_qps} q/s")
                paced[peer] = self.perf(
                    started[peer][1], f"{peer}-p99", seconds=plan.p99_seconds,
                    qps_limit=plan.p99_qps, verbose=True,
                )  # fmt: skip
            child, port = started["doqproxy"]
            found["profile"] = self.profile(spy, child, port, "hit")
        finally:
            for child, _ in started.values():
                self.children.stop(child)
        for peer in names:
            valid = [r for r in rounds[peer] if r[0].all_noerror] or rounds[peer]
            best, cpu = max(valid, key=lambda r: r[0].qps)
            found[peer] = report.hit_entry(best, paced[peer], cpu, plan.p99_qps)
            found[peer]["rounds_qps"] = [round(r.qps) for r, _ in rounds[peer]]
        for peer in ("unbound", "dnsmasq"):
            ours, theirs = found["doqproxy"]["qps"], found[peer]["qps"]
            ok = found["doqproxy"]["valid"] and found[peer]["valid"]
            found[f"ratio_{peer}"] = round(ours / theirs, 3) if ok and theirs else None
        found["doqproxy_cache"] = self.forward_caches
        found["seconds"] = plan.hit_seconds
        if not self.forward_caches:
            self.notes.append(
                "this build of `doqproxy forward` has no cache (no --no-cache option): "
                "its 'cache hit' figures are misses through DoQ"
            )
        return found

    def profile(self, spy: str | None, child: Child, port: int, label: str) -> Any:
        """py-spy on ``child`` while dnsperf saturates it (a separate, unmeasured run)."""
        if spy is None:
            return None
        progress(f"{label} path: py-spy on doqproxy forward")
        out = self.workdir / f"py-spy-{label}.txt"
        spying = profile.start(spy, child.pid, self.plan.profile_seconds, out)
        time.sleep(0.3)
        self.perf(port, f"{label}-profile", seconds=self.plan.profile_seconds)
        return profile.finish(spying, out)

    def miss_path(self, spy: str | None) -> dict[str, Any]:
        """dnsperf → forward (cache off) → serve, then the bare client against the same serve."""
        plan = self.plan
        progress("miss path: doqproxy forward --no-cache")
        child, port, metrics_port = self.start_forward(
            "forward-miss", self.doq_port, self.state(), cache=False
        )
        try:
            warm = self.perf(port, "miss-warm", runs=1)
            if not warm.all_noerror:
                raise BenchError(f"miss path warm-up: {warm.rcode_text()}")
            rss_before = rss_kib(child.pid)
            pids = {"forward": child.pid, "serve": self.serve.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.monotonic()
            run = self.perf(port, "miss", seconds=plan.miss_seconds)
            elapsed = time.monotonic() - t0
            found: dict[str, Any] = {
                "forward": report.perf_entry(run),
                "forward_cpu_pct": {
                    name: round(100 * (cpu_seconds(pid) - before[name]) / elapsed)
                    for name, pid in pids.items()
                },
            }
            found["profile"] = self.profile(spy, child, port, "miss")
            found["forward_rss_mb"] = [
                round(rss_before / 1024, 1),
                round(rss_kib(child.pid) / 1024, 1),
            ]
            if metrics_port is not None:
                metrics = link.scrape(metrics_port)
                found["forward_connections_opened"] = int(
                    metrics.get("doqproxy_upstream_connections_opened_total", 0)
                )
        finally:
            self.children.stop(child)
        bare = {}
        for connections in (1, 4):
            progress(f"miss path: bare aioquic client, {connections} connection(s)")
            bare[str(connections)] = self.bare_client(self.doq_port, connections, 100)
        found["bare_client"] = bare["1"]
        found["bare_client_4"] = bare["4"]
        ours = found["forward"]
        for key, entry in (("ratio", bare["1"]), ("ratio_4", bare["4"])):
            found[key] = (
                round(ours["qps"] / entry["qps"], 3) if ours["valid"] and entry["valid"] else None
            )
        return found

    def engines(self) -> dict[str, Any]:
        """CPU per miss, datagrams per query each way and q/s: doqproxy forward on each
        installed QUIC engine, then the bare clients, one at a time against one serve."""
        plan = self.plan
        installed = engines.installed_engines()
        has_flag = (
            "--quic-engine"
            in subprocess.run(
                doqproxy_argv("forward", "--help"), capture_output=True, text=True, check=True
            ).stdout
        )
        found: dict[str, Any] = {"engines": installed, "seconds": plan.miss_seconds}

        def run(port: int, label: str) -> dnsperf.PerfResult:
            if label.endswith("-warm"):
                return self.perf(port, label, runs=1)
            return self.perf(port, label, seconds=plan.miss_seconds)

        for engine in installed if has_flag else ["default"]:
            progress(f"engines: doqproxy forward --no-cache, QUIC engine {engine}")
            extra = ("--quic-engine", engine) if has_flag else ()
            child, port, _ = self.start_forward(
                f"forward-{engine}", self.doq_port, self.state(), cache=False, extra=extra
            )
            try:
                found[f"doqproxy_{engine}"] = engines.forward_case(child, port, run, engine)
            finally:
                self.children.stop(child)
        for engine in installed:
            progress(f"engines: bare {engine} client, 1 connection, 100 streams")
            found[f"bare_{engine}"] = self.bare_client(self.doq_port, 1, 100, engine=engine)
        progress("engines: each engine's own floor, in memory (bench.engine_floor)")
        found["floor"] = engines.floor(installed, 2000 if plan.quick else 20000)
        found["default_engine"] = engines.default_engine()
        progress("engines: doqproxy's own Python per miss, scripted engine (bench.pipeline)")
        found["pipeline"] = engines.pipeline(5000 if plan.quick else 50000)
        progress("engines: the same with the cache on, every query a miss (bench.pipeline --cache)")
        found["pipeline_cache"] = engines.pipeline(5000 if plan.quick else 50000, cache=True)
        return found

    def bare_client(
        self,
        port: int,
        connections: int,
        concurrency: int,
        seconds: float | None = None,
        engine: str = "aioquic",
    ) -> dict[str, Any]:
        seconds = self.plan.miss_seconds if seconds is None else seconds
        argv = [
            sys.executable, "-m", "bench.bare_client",
            "--server", f"{LOOPBACK}:{port}", "--ca", str(self.ca),
            "--server-name", SERVER_NAME, "--names", str(self.hit_file),
            "--seconds", str(seconds), "--concurrency", str(concurrency),
            "--connections", str(connections), "--engine", engine,
        ]  # fmt: skip
        cpu0 = cpu_seconds(self.serve.pid)
        t0 = time.monotonic()
        child = self.children.start("bare-client", argv)
        child.proc.wait(seconds + 60)
        elapsed = time.monotonic() - t0
        self.children.stop(child)
        lines = child.log.read_text().strip().splitlines()
        if child.proc.returncode != 0 or not lines:
            raise BenchError(f"bare client failed:\n{child.tail()}")
        result: dict[str, Any] = json.loads(lines[-1])
        result["qps"] = round(result["qps"], 1)
        result["serve_cpu_pct"] = round(100 * (cpu_seconds(self.serve.pid) - cpu0) / elapsed)
        result["valid"] = result["errors"] == 0 and set(result["rcodes"]) == {"NOERROR"}
        return result

    def link(self) -> dict[str, Any]:
        plan = self.plan
        progress(f"link: relay adding {plan.link_rtt_ms:g} ms RTT, {plan.link_runs} runs")
        relay = self.children.start(
            "relay",
            [
                sys.executable, "-m", "bench.relay", "--listen", f"{LOOPBACK}:0",
                "--upstream", f"{LOOPBACK}:{self.doq_port}",
                "--delay-ms", str(plan.link_rtt_ms / 2),
            ],
        )  # fmt: skip
        relay_port = int(wait_log(relay, r"ready (\d+)")[1])

        def start(name: str, state: Path) -> tuple[Child, int, int | None]:
            return self.start_forward(name, relay_port, state, metrics=True)

        try:
            result = link.measure(
                plan.link_runs,
                plan.link_rtt_ms,
                peers.hit_names(plan.hit_names),
                self.workdir / "link",
                start,
                self.children.stop,
            )
            progress("link: floor (bare aioquic client, one query at a time, through the relay)")
            floor = self.bare_client(relay_port, 1, 1, seconds=2 if plan.quick else 3)
        finally:
            self.children.stop(relay)
        found = result.as_dict()
        found["floor_bare_client_median_ms"] = floor["median_ms"] if floor["valid"] else None
        return found

    def failover(self) -> dict[str, Any]:
        """Three upstreams behind relays (5, 20, 60 ms RTT); the fastest goes silent a
        third of the way into a paced run of misses and comes back two thirds in."""
        plan = self.plan
        rtts = (5.0, 20.0, 60.0)
        relays: list[Child] = []
        ports: list[int] = []
        child = None
        try:
            for rtt in rtts:
                relay = self.children.start(
                    f"relay-{rtt:g}ms",
                    [
                        sys.executable, "-m", "bench.relay", "--listen", f"{LOOPBACK}:0",
                        "--upstream", f"{LOOPBACK}:{self.doq_port}", "--delay-ms", str(rtt / 2),
                        "--coarse",
                    ],
                )  # fmt: skip
                relays.append(relay)
                ports.append(int(wait_log(relay, r"ready (\d+)")[1]))
            child, port, metrics_port = self.start_forward(
                "forward-failover", ports, self.state(), cache=False, metrics=True,
                extra=("--upstream-strategy", "fastest"),
            )  # fmt: skip
            names = [f"{n}." for n in peers.hit_names(plan.hit_names)]
            warm = 1.0 if plan.quick else 2.0
            progress(f"failover: {warm:g} s of warm-up at 200 q/s (the strategy learns the RTTs)")
            asyncio.run(failover.paced(port, names, 200, warm, [], linger=1.0))
            seconds, qps = plan.failover_seconds, plan.failover_qps
            blackhole_at, restore_at = seconds / 3, 2 * seconds / 3
            fastest = relays[0].pid
            progress(
                f"failover: {qps} q/s for {seconds:g} s; the 5 ms upstream black-holed "
                f"from {blackhole_at:g} s to {restore_at:g} s"
            )
            samples = asyncio.run(
                failover.paced(
                    port, names, qps, seconds,
                    [
                        (blackhole_at, lambda: os.kill(fastest, signal.SIGUSR1)),
                        (restore_at, lambda: os.kill(fastest, signal.SIGUSR2)),
                    ],
                    linger=2.0 if plan.quick else 5.0,
                )
            )  # fmt: skip
            hedge_min_ms = 50.0
            found = failover.summarize(samples, blackhole_at, restore_at, hedge_min_ms / 1000)
            found |= {
                "rtts_ms": list(rtts),
                "qps": qps,
                "seconds": seconds,
                "hedge_delay_min_ms": hedge_min_ms,
                "goal_p99_during_ms": hedge_min_ms + rtts[1] + 10,
            }
            if metrics_port is not None:
                metrics = link.scrape(metrics_port)
                found["hedged_total"] = int(metrics.get("doqproxy_upstream_hedged_total", 0))
        finally:
            if child is not None:
                self.children.stop(child)
            for relay in relays:
                self.children.stop(relay)
        return found

    def memory(self) -> dict[str, Any]:
        names = self.plan.memory_names
        progress(f"memory: {names} distinct names through doqproxy forward")
        # Default settings (no metrics endpoint): the entry count comes from the
        # summary line SIGUSR1 logs.
        child, port, _ = self.start_forward("forward-memory", self.doq_port, self.state())
        try:
            time.sleep(0.2)
            before = rss_kib(child.pid)
            run = self.perf(port, "memory", datafile=self.memory_file, runs=1, outstanding=100)
            time.sleep(0.2)
            after = rss_kib(child.pid)
            entries = self.logged_cache_entries(child) if self.forward_caches else None
        finally:
            self.children.stop(child)
        return {
            "names": names,
            "answers": report.perf_entry(run),
            "rss_mb_start": round(before / 1024, 1),
            "rss_mb": round(after / 1024, 1),
            "cache_entries": None if entries is None else int(entries),
            "metrics_listen_on": False,
        }

    @staticmethod
    def logged_cache_entries(child: Child) -> int | None:
        """Ask the forward for its SIGUSR1 summary and read the cache size from it."""
        os.kill(child.pid, signal.SIGUSR1)
        for _ in range(50):
            found = re.findall(r"cache (\d+) entries", child.tail(20))
            if found:
                return int(found[-1])
            time.sleep(0.1)
        return None

    def state(self) -> Path:
        path = self.workdir / f"state-{self.forwards}"
        path.mkdir(exist_ok=True)
        return path


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="about a second per case")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--no-install", action="store_true", help="never apt-get/pip install")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (logs) for debugging"
    )
    parser.add_argument(
        "--case",
        action="append",
        choices=CASES,
        help="run only this case (repeatable); the report shows what ran",
    )
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    setup_log: list[str] = []
    try:
        if not args.no_install:
            peers.install_tools(setup_log)
        elif peers.missing_tools():
            raise BenchError(f"missing tools: {', '.join(peers.missing_tools())}")
        spy = None
        if not args.no_profile:
            spy = profile.py_spy(setup_log, install=not args.no_install)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    for line in setup_log:
        progress(line)
    workdir = Path(tempfile.mkdtemp(prefix="doqproxy-bench-"))
    children = Children(workdir)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "mode": "quick" if plan.quick else "full",
        "machine": peers.machine(),
        "versions": peers.versions(),
        "setup": setup_log,
        "workdir": str(workdir),
    }
    try:
        bench = Bench(plan, workdir, children)
        progress("starting doqproxy serve --zone (DoQ) and Unbound local-data (plain DNS)")
        bench.start_backends()
        results["backends"] = {
            "doq": f"doqproxy serve --zone ({plan.hit_names} n* + {plan.memory_names} m* names)",
            "plain": f"Unbound 1 thread, local-zone static + local-data ({plan.hit_names} names)",
        }
        cases = args.case or list(CASES)
        if "cache_hit" in cases:
            results["cache_hit"] = bench.cache_hit(spy)
        if "miss_path" in cases:
            results["miss_path"] = bench.miss_path(spy)
        if "engines" in cases:
            results["engines"] = bench.engines()
        if "link" in cases:
            results["link"] = bench.link()
        if "failover" in cases:
            results["failover"] = bench.failover()
        if "memory" in cases:
            results["memory"] = bench.memory()
        results["notes"] = bench.notes
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        children.close()
        if args.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["machine"]["loadavg_at_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results["goals"] = report.goals(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(report.markdown(results))
    report.plot(results, args.output.with_name("latency.png"))
    return 0
