"""Clients for the LAN-safety tests: UDP bursts from chosen loopback sources, metrics."""

from __future__ import annotations

import select
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import dns.message
from prometheus_client.parser import text_string_to_metric_families

from .conftest import tcp_accepting


def make_query(name: str, rdtype: str = "A", msg_id: int = 0, **kwargs: object) -> bytes:
    message = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    message.id = msg_id
    return message.to_wire()


def udp_burst(
    port: int,
    queries: list[bytes],
    *,
    source: str = "127.0.0.1",
    source_port: int = 0,
    quiet: float = 1.5,
    host: str = "127.0.0.1",
) -> list[dns.message.Message]:
    """Send every query at once from ``source``, then collect replies until ``quiet``
    seconds pass without one (blocking: call it in a thread)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((source, source_port))
        for data in queries:
            sock.sendto(data, (host, port))
        replies = []
        while True:
            ready, _, _ = select.select([sock], [], [], quiet)
            if not ready:
                return replies
            replies.append(dns.message.from_wire(sock.recv(65535)))


def send_raw_udp(source: str, source_port: int, port: int, payload: bytes) -> None:
    """One UDP datagram with any source port (0 included), through a raw socket (root)."""
    src = socket.inet_aton(source)
    dst = socket.inet_aton("127.0.0.1")
    udp = struct.pack("!HHHH", source_port, port, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp, ("127.0.0.1", 0))


def tcp_ask(port: int, data: bytes, *, source: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """One query over a fresh TCP connection; the raw reply (b"" if closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout, (source, 0)) as sock:
        sock.sendall(struct.pack("!H", len(data)) + data)
        return read_framed(sock)


def read_framed(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, 2)
    if len(head) < 2:
        return b""
    return recv_exactly(sock, struct.unpack("!H", head)[0])


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def scrape(
    port: int, host: str = "127.0.0.1"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels) (blocking)."""
    text = ""
    for _ in range(200):
        if not tcp_accepting(port, host):
            time.sleep(0.05)
            continue
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            break
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            time.sleep(0.05)
    else:
        raise AssertionError(f"no metrics endpoint on port {port}")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def wait_for_line(read: Callable[[], str], text: str, timeout: float = 15.0) -> str:
    """Poll a process's log (``read``) until ``text`` shows up; the whole log."""
    deadline = time.monotonic() + timeout
    while True:
        log = read()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{log}")
        time.sleep(0.05)
