"""Child processes, ports, certificates and small probes for the benchmark harness.

Every process is started through :class:`Children`, which keeps its handle and stops
it (SIGTERM, then SIGKILL) when the harness ends, also on Ctrl-C or an exception.
Children run in their own session, so a Ctrl-C on the terminal reaches only the
harness, which then stops them in reverse order.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rcode

from doqproxy import devcerts

SERVER_NAME = "doq.bench.test"
LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A step of the benchmark cannot go on; the message says why."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Children:
    """The processes this harness started, each stopped by its own handle."""

    workdir: Path
    running: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.workdir / f"{name}.{len(self.running)}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                cwd=REPO,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.running.append(child)
        return child

    def stop(self, child: Child, timeout: float = 10.0) -> int:
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        if child in self.running:
            self.running.remove(child)
        return child.proc.returncode

    def close(self) -> None:
        for child in reversed(list(self.running)):
            self.stop(child, timeout=5.0)


def doqproxy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "doqproxy", *args]


def free_port() -> int:
    """A port free for both UDP and TCP on the loopback address."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise BenchError("no free loopback port")


def wait_log(child: Child, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, child.log.read_text(errors="replace"))
        if match:
            return match
        child.check()
        time.sleep(0.02)
    raise BenchError(
        f"{child.name}: no {pattern!r} in its log after {timeout:.0f}s:\n{child.tail()}"
    )


class Notify:
    """A $NOTIFY_SOCKET for one child: ``wait_ready`` returns once it sent READY=1."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, child: Child, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.05)
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return
            except TimeoutError:
                child.check()
        raise BenchError(f"{child.name} did not report READY=1:\n{child.tail()}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def query(port: int, name: str, timeout: float = 5.0, rdtype: str = "A") -> tuple[str, float]:
    """Ask ``name`` over UDP; the rcode's text and the milliseconds until the answer."""
    message = dns.message.make_query(name, rdtype)
    wire = message.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((LOOPBACK, port))
        started = time.perf_counter()
        sock.send(wire)
        while True:
            data = sock.recv(65535)
            elapsed = (time.perf_counter() - started) * 1000
            # QR set: a socket whose ephemeral port is ``port`` reads its own query.
            if data[:2] == wire[:2] and len(data) > 2 and data[2] & 0x80:
                return dns.rcode.to_text(dns.message.from_wire(data).rcode()), elapsed


def wait_answering(child: Child, port: int, name: str, timeout: float = 20.0) -> None:
    """Until the plain DNS server on ``port`` answers ``name`` with NOERROR."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        child.check()
        try:
            last, _ = query(port, name, timeout=0.3)
            if last == "NOERROR":
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{child.name} on port {port}: {name} gave {last}:\n{child.tail()}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for SERVER_NAME and 127.0.0.1."""
    return devcerts.make_certificates(directory, SERVER_NAME, label="bench")
