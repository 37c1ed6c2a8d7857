"""``make demo``: doqproxy end to end on loopback, offline, without root.

1. Make a throwaway CA and server certificate in a temporary directory.
2. Start ``doqproxy serve`` (DoQ) with the bundled zone ``demo.zone``.
3. Start ``doqproxy forward`` on 127.0.0.1:5353 (plain DNS) pointed at it.
4. Ask a few questions over plain DNS and print them like ``dig +short``, with timings.
5. Stop both and remove the directory, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from doqproxy import devcerts

HERE = Path(__file__).resolve().parent
SERVER_NAME = "doq.demo.test"
QUERIES = [
    ("www.demo.test", "A", "udp", "first ask: a cache miss, answered over DoQ"),
    ("www.demo.test", "A", "udp", "same question again: a cache hit"),
    ("alias.demo.test", "A", "udp", "a CNAME inside the zone"),
    ("shop.apps.demo.test", "A", "udp", "a wildcard"),
    ("nope.demo.test", "A", "udp", "a name that does not exist"),
    ("big.demo.test", "TXT", "tcp", "over TCP"),
]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for SERVER_NAME and 127.0.0.1."""
    return devcerts.make_certificates(directory, SERVER_NAME, label="demo")


class Process:
    """A doqproxy sub-command whose stderr goes to a log file."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "doqproxy", *args],
                stdout=subprocess.DEVNULL,
                stderr=handle,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"doqproxy {self.name} exited:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for_serve(serve: Process, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on quic://127\.0\.0\.1:(\d+)", serve.log.read_text())
        if match:
            return int(match.group(1))
        serve.check_alive()
        time.sleep(0.05)
    raise SystemExit(f"doqproxy serve did not start:\n{serve.log.read_text()}")


def wait_for_forward(forward: Process, port: int, timeout: float = 20.0) -> None:
    probe = dns.message.make_query("demo.test", "SOA")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        forward.check_alive()
        try:
            dns.query.tcp(probe, "127.0.0.1", port=port, timeout=1.0)
            return
        except (OSError, dns.exception.Timeout):
            time.sleep(0.1)
    raise SystemExit(f"doqproxy forward did not start:\n{forward.log.read_text()}")


def short(answer: dns.message.Message) -> list[str]:
    """What ``dig +short`` prints: the answer records' data, or nothing."""
    return [rdata.to_text() for rrset in answer.answer for rdata in rrset]


def ask(port: int, name: str, rdtype: str, transport: str) -> tuple[dns.message.Message, float]:
    message = dns.message.make_query(name, rdtype, use_edns=0)
    started = time.perf_counter()
    if transport == "tcp":
        answer = dns.query.tcp(message, "127.0.0.1", port=port, timeout=5.0)
    else:
        answer = dns.query.udp(message, "127.0.0.1", port=port, timeout=5.0)
    return answer, (time.perf_counter() - started) * 1000


def port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def run(port: int, workdir: Path) -> None:
    ca_file, cert_file, key_file = make_certificates(workdir)
    print(f"certificates for {SERVER_NAME} in {workdir}")
    processes: list[Process] = []
    try:
        serve = Process(
            "serve",
            ["serve", "-v", "-l", "127.0.0.1:0", "--cert", str(cert_file), "--key", str(key_file),
             "--zone", str(HERE / "demo.zone")],
            workdir / "serve.log",
        )  # fmt: skip
        processes.append(serve)
        doq_port = wait_for_serve(serve)
        print(f"doqproxy serve:   quic://127.0.0.1:{doq_port}  (zone demo.test.)")
        forward = Process(
            "forward",
            ["forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{doq_port}",
             "--tls-ca-file", str(ca_file), "--tls-server-name", SERVER_NAME,
             "--state-dir", str(workdir / "state")],
            workdir / "forward.log",
        )  # fmt: skip
        processes.append(forward)
        wait_for_forward(forward, port)
        print(f"doqproxy forward: 127.0.0.1:{port} (UDP and TCP) -> quic://127.0.0.1:{doq_port}")
        print()
        for name, rdtype, transport, note in QUERIES:
            answer, elapsed = ask(port, name, rdtype, transport)
            data = short(answer) or [dns.rcode.to_text(answer.rcode())]
            tcp = "+tcp " if transport == "tcp" else ""
            print(f"$ dig @127.0.0.1 -p {port} {tcp}+short {name} {rdtype}")
            for line in data:
                print(f"  {line if len(line) <= 72 else line[:69] + '...'}")
            print(f"  ;; {elapsed:6.1f} ms  {note}")
    finally:
        for process in reversed(processes):
            process.stop()
    print()
    print("stopped doqproxy forward and doqproxy serve")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5353, help="plain DNS port (default 5353)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not port_is_free(args.port):
        print(f"127.0.0.1:{args.port} is in use; try: make demo DEMO_PORT=5354", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="doqproxy-demo-"))
    try:
        run(args.port, workdir)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
