"""``python -m bench.soak [--seconds 600]`` (``make soak``): a long run under trouble.

The chain is::

    load (UDP + TCP) -> doqproxy forward -> relay (5% loss each way) -> doqproxy serve --zone

- The load asks a fixed set of names: 70% from names with a long TTL (cache hits
  once warm), 30% from names with TTL 0 (always a miss, so always upstream). With
  a fixed set, the cache stops growing, and a flat RSS means nothing leaks.
- Every 30 s the upstream (``serve``) is killed with SIGKILL and started again on
  the same port.
- Every minute: a burst of ANY queries, slow TCP clients (one byte every half
  second) and TCP clients that pipeline queries and never read.

At the end it prints, for the regular load: sent, answered, SERVFAIL, unanswered
(goal 0), p50/p99 latency, and the forwarder's RSS (goal: flat within ±10% from
the end of the warm-up) and open file descriptors at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dns.message
import dns.rcode

from bench.procs import (
    LOOPBACK,
    SERVER_NAME,
    Child,
    Children,
    doqproxy_argv,
    free_port,
    make_certificates,
    rss_kib,
    wait_answering,
    wait_log,
)

HOT, COLD = 700, 300
MISS_SHARE = 0.3
UDP_RATE, TCP_RATE = 120.0, 40.0
"""Queries per second of the regular load (the machine is shared: modest on purpose)."""
TCP_CONNECTIONS = 4
CLIENT_TIMEOUT = 10.0
RESTART_EVERY = 30.0
ABUSE_EVERY = 60.0
WARMUP = 15.0


def zone_text() -> str:
    lines = ["$ORIGIN soak.test.", "$TTL 3600", "@ IN SOA ns hostmaster 1 3600 600 86400 60",
             "@ IN NS ns", "ns IN A 192.0.2.53"]  # fmt: skip
    lines += [f"h{n} IN A 192.0.2.{n % 250 + 1}" for n in range(HOT)]
    lines += [f"m{n} 0 IN A 198.51.100.{n % 250 + 1}" for n in range(COLD)]
    chunk = " ".join(f'"{c * 250}"' for c in "abcdefghijklmnop")
    lines.append(f"big IN TXT {chunk}")
    return "\n".join(lines) + "\n"


def pick_name() -> str:
    if random.random() < MISS_SHARE:
        return f"m{random.randrange(COLD)}.soak.test."
    return f"h{random.randrange(HOT)}.soak.test."


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    servfail: int = 0
    other_rcodes: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def answer(self, rcode: int, started: float) -> None:
        self.answered += 1
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        if rcode == dns.rcode.SERVFAIL:
            self.servfail += 1
        elif rcode != dns.rcode.NOERROR:
            text = dns.rcode.to_text(rcode)
            self.other_rcodes[text] = self.other_rcodes.get(text, 0) + 1


class UdpClient(asyncio.DatagramProtocol):
    """One connected UDP socket; replies matched by ID."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 12:
            future = self.pending.get(struct.unpack("!H", data[:2])[0])
            if future is not None and not future.done():
                future.set_result(data)

    async def ask(self, wire: bytes, tally: Tally) -> None:
        msg_id = random.randrange(65536)
        while msg_id in self.pending:
            msg_id = random.randrange(65536)
        future = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        assert self.transport is not None
        started = time.perf_counter()
        tally.sent += 1
        self.transport.sendto(struct.pack("!H", msg_id) + wire[2:])
        try:
            data = await asyncio.wait_for(future, CLIENT_TIMEOUT)
            tally.answer(data[3] & 0x0F, started)
        except TimeoutError:
            tally.unanswered += 1
        finally:
            del self.pending[msg_id]


class TcpClient:
    """A persistent TCP connection pipelining queries; reconnects and re-sends on loss."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Future[None]] = set()

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self.writer is not None and not self.writer.is_closing():
                return self.writer
            reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
            self.writer = writer
            self._spawn(self._read(reader, writer))
            for _, frame in self.pending.values():  # what the last connection never answered
                writer.write(frame)
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                entry = self.pending.get(struct.unpack("!H", data[:2])[0])
                if entry is not None and not entry[0].done():
                    entry[0].set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if self.writer is writer:
                self.writer = None
                self.reconnects += 1
                if self.pending:
                    self._spawn(self._safe_connect())

    async def _safe_connect(self) -> None:
        with contextlib.suppress(OSError):
            await self._connect()

    async def ask(self, wire: bytes, tally: Tally) -> None:
        msg_id = random.randrange(65536)
        while msg_id in self.pending:
            msg_id = random.randrange(65536)
        query = struct.pack("!H", msg_id) + wire[2:]
        frame = struct.pack("!H", len(query)) + query
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = (future, frame)
        started = time.perf_counter()
        tally.sent += 1
        try:
            writer = await self._connect()
            writer.write(frame)
            data = await asyncio.wait_for(future, CLIENT_TIMEOUT)
            tally.answer(data[3] & 0x0F, started)
        except (TimeoutError, OSError):
            tally.unanswered += 1
        finally:
            del self.pending[msg_id]


async def paced(rate: float, deadline: float, ask: object) -> None:
    """Start ``ask(wire)`` ``rate`` times a second until ``deadline``, without waiting."""
    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / rate
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        wire = dns.message.make_query(pick_name(), "A").to_wire()
        task = asyncio.ensure_future(ask(wire))  # type: ignore[operator]
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks)


async def abuse(port: int, counts: dict[str, int]) -> None:
    """A burst of ANY, slow TCP clients and never-reading TCP clients, for about 20 s."""
    loop = asyncio.get_running_loop()
    _, udp = await loop.create_datagram_endpoint(UdpClient, remote_addr=(LOOPBACK, port))
    ignored = Tally()
    any_queries = [
        udp.ask(dns.message.make_query(f"h{n}.soak.test.", "ANY").to_wire(), ignored)
        for n in range(200)
    ]
    writers: list[asyncio.StreamWriter] = []
    big = dns.message.make_query("big.soak.test.", "TXT", use_edns=0).to_wire()
    for _ in range(10):  # pipelines 100 queries for a 4 KB answer, never reads
        _, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write((struct.pack("!H", len(big)) + big) * 100)
        writers.append(writer)
        counts["never_reading"] += 1

    async def slow_client() -> None:
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            return
        counts["slow_tcp"] += 1
        writers.append(writer)
        frame = struct.pack("!H", len(big)) + big
        for byte in frame[:40]:
            if writer.is_closing():
                return
            writer.write(bytes([byte]))
            await asyncio.sleep(0.5)

    await asyncio.gather(*any_queries, *(slow_client() for _ in range(20)))
    counts["any"] += len(any_queries)
    await asyncio.sleep(max(0.0, 20 - 0.5 * 40))
    for writer in writers:
        writer.transport.abort()
    udp.transport.close()  # type: ignore[union-attr]


@dataclass
class Report:
    seconds: float
    sent: int
    answered: int
    servfail: int
    unanswered: int
    other_rcodes: dict[str, int]
    p50_ms: float
    p99_ms: float
    rss_start_kib: int
    rss_end_kib: int
    rss_change_pct: float
    fds_start: int
    fds_end: int
    upstream_restarts: int
    abuse: dict[str, int]
    tcp_reconnects: int


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


class Soak:
    def __init__(self, seconds: float, workdir: Path) -> None:
        self.seconds = seconds
        self.workdir = workdir
        self.children = Children(workdir)
        self.ca, self.cert, self.key = make_certificates(workdir)
        self.zone = workdir / "soak.zone"
        self.zone.write_text(zone_text())
        self.serve_port = free_port()
        self.serve: Child | None = None
        self.restarts = 0

    def start_serve(self) -> None:
        self.serve = self.children.start(
            "serve",
            doqproxy_argv(
                "serve",
                "-l",
                f"{LOOPBACK}:{self.serve_port}",
                "--cert",
                str(self.cert),
                "--key",
                str(self.key),
                "--zone",
                str(self.zone),
                "-v",
            ),
        )
        wait_log(self.serve, r"listening on quic://")

    def kill_serve(self) -> None:
        if self.serve is not None:
            self.serve.proc.send_signal(signal.SIGKILL)
            self.children.stop(self.serve)
            self.serve = None

    async def run(self) -> Report:
        self.start_serve()
        relay = self.children.start(
            "relay",
            [sys.executable, "-m", "bench.relay", "--listen", f"{LOOPBACK}:0",
             "--upstream", f"{LOOPBACK}:{self.serve_port}", "--delay-ms", "0", "--loss", "5"],
        )  # fmt: skip
        relay_port = int(wait_log(relay, r"ready (\d+)")[1])
        port = free_port()
        forward = self.children.start(
            "forward",
            doqproxy_argv(
                "forward",
                "-l",
                f"{LOOPBACK}:{port}",
                "-u",
                f"quic://{LOOPBACK}:{relay_port}",
                "--tls-ca-file",
                str(self.ca),
                "--tls-server-name",
                SERVER_NAME,
                "--state-dir",
                str(self.workdir / "state"),
            ),
        )
        await asyncio.to_thread(wait_answering, forward, port, "h1.soak.test.")
        loop = asyncio.get_running_loop()
        udp_clients = [
            (await loop.create_datagram_endpoint(UdpClient, remote_addr=(LOOPBACK, port)))[1]
            for _ in range(8)
        ]
        tcp_clients = [TcpClient(port) for _ in range(TCP_CONNECTIONS)]
        tally = Tally()
        started = time.monotonic()
        deadline = started + self.seconds
        abuse_counts = {"any": 0, "slow_tcp": 0, "never_reading": 0}

        async def troubles() -> None:
            next_restart = started + RESTART_EVERY
            next_abuse = started + 20.0
            abuses: list[asyncio.Task[None]] = []
            while True:
                now = time.monotonic()
                if now >= deadline - 5:
                    break
                if now >= next_restart:
                    self.kill_serve()
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(self.start_serve)
                    self.restarts += 1
                    next_restart += RESTART_EVERY
                if now >= next_abuse:
                    abuses.append(asyncio.ensure_future(abuse(port, abuse_counts)))
                    next_abuse += ABUSE_EVERY
                await asyncio.sleep(0.2)
            await asyncio.gather(*abuses, return_exceptions=True)

        async def sample_start() -> tuple[int, int]:
            await asyncio.sleep(min(WARMUP, self.seconds / 4))
            return rss_kib(forward.pid), open_fds(forward.pid)

        start_sample = asyncio.ensure_future(sample_start())
        await asyncio.gather(
            paced(UDP_RATE, deadline, lambda w: random.choice(udp_clients).ask(w, tally)),
            paced(TCP_RATE, deadline, lambda w: random.choice(tcp_clients).ask(w, tally)),
            troubles(),
        )
        rss_start, fds_start = await start_sample
        await asyncio.sleep(1)
        forward.check()
        rss_end, fds_end = rss_kib(forward.pid), open_fds(forward.pid)
        for client in udp_clients:
            assert client.transport is not None
            client.transport.close()
        for tcp in tcp_clients:
            if tcp.writer is not None:
                tcp.writer.close()
        return Report(
            seconds=round(time.monotonic() - started, 1),
            sent=tally.sent,
            answered=tally.answered,
            servfail=tally.servfail,
            unanswered=tally.unanswered,
            other_rcodes=tally.other_rcodes,
            p50_ms=round(percentile(tally.latencies_ms, 0.5), 2),
            p99_ms=round(percentile(tally.latencies_ms, 0.99), 2),
            rss_start_kib=rss_start,
            rss_end_kib=rss_end,
            rss_change_pct=round((rss_end - rss_start) / rss_start * 100, 1),
            fds_start=fds_start,
            fds_end=fds_end,
            upstream_restarts=self.restarts,
            abuse=abuse_counts,
            tcp_reconnects=sum(tcp.reconnects for tcp in tcp_clients),
        )


def markdown(report: Report) -> str:
    flat = abs(report.rss_change_pct) <= 10
    rows = [
        ("duration", f"{report.seconds:g} s"),
        ("sent (UDP + TCP)", f"{report.sent:,}"),
        ("answered", f"{report.answered:,}"),
        ("SERVFAIL", f"{report.servfail:,}"),
        ("other rcodes", ", ".join(f"{k} {v}" for k, v in report.other_rcodes.items()) or "none"),
        ("unanswered (goal 0)", f"{report.unanswered:,}"),
        ("latency p50 / p99", f"{report.p50_ms:g} / {report.p99_ms:g} ms"),
        (
            "forwarder RSS start → end",
            f"{report.rss_start_kib / 1024:.1f} → {report.rss_end_kib / 1024:.1f} MiB "
            f"({report.rss_change_pct:+.1f}%, {'flat' if flat else 'NOT flat'} by ±10%)",
        ),
        ("forwarder open fds start → end", f"{report.fds_start} → {report.fds_end}"),
        ("upstream restarts (SIGKILL)", str(report.upstream_restarts)),
        ("abuse", ", ".join(f"{k} {v}" for k, v in report.abuse.items())),
        ("load TCP reconnects", str(report.tcp_reconnects)),
    ]
    lines = ["| soak | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="doqproxy-soak-") as tmp:
        soak = Soak(args.seconds, Path(tmp))
        try:
            report = asyncio.run(soak.run())
        finally:
            soak.children.close()
    print(f"# soak, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"python -m bench.soak --seconds {args.seconds:g}")  # fmt: skip
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.unanswered == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
