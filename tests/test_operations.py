"""Metrics, query log, SIGUSR1 and --user on a real ``doqproxy forward`` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Certs, ProxyProcess, free_port, tcp_accepting
from .doq_fixture import DoqTestUpstream
from .nobody import NobodyPython

StartProxy = Callable[..., ProxyProcess]


async def ask(proxy: ProxyProcess, name: str, rdtype: str = "A", tcp: bool = False) -> str:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        response = await dns.asyncquery.tcp(query, "127.0.0.1", port=proxy.port, timeout=10)
    else:
        response = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
    return str(response.rcode())


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""

    def fetch() -> str:
        # The metrics endpoint comes up just after the DNS listeners.
        for _ in range(100):
            if not tcp_accepting(port):
                time.sleep(0.05)
                continue
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=10
                ) as reply:
                    return str(reply.read().decode())
            except urllib.error.URLError as exc:
                if not isinstance(exc.reason, ConnectionRefusedError):
                    raise
                time.sleep(0.05)
        raise AssertionError(f"no metrics endpoint on port {port}")

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_move(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    metrics_port = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics_port}", cache=True)
    name = f"quic://127.0.0.1:{upstream.port}"
    up = (("upstream", name),)
    before = await scrape(metrics_port)
    assert before[("doqproxy_upstream_handshakes_total", up)] == 0
    assert before[("doqproxy_in_flight_queries", ())] == 0

    for index in range(3):
        await ask(proxy, f"n{index}.test.")
    await ask(proxy, "a.test.", "AAAA", tcp=True)
    await ask(proxy, "missing.test.")
    await ask(proxy, "n0.test.")  # from the cache
    after = await scrape(metrics_port)

    def queries(transport: str, qtype: str, rcode: str) -> float:
        key = (("qtype", qtype), ("rcode", rcode), ("transport", transport))
        return after.get(("doqproxy_queries_total", key), 0)

    assert queries("udp", "A", "NOERROR") == 4
    assert queries("tcp", "AAAA", "NOERROR") == 1
    assert queries("udp", "A", "NXDOMAIN") == 1
    assert after[("doqproxy_resolver_received_total", ())] == 6
    assert after[("doqproxy_cache_hits_total", ())] == 1
    assert after[("doqproxy_cache_misses_total", ())] == 5
    assert after[("doqproxy_cache_entries", ())] == 5
    assert len(upstream.state.seen) == 5
    assert after[("doqproxy_upstream_handshakes_total", up)] == 1
    assert after[("doqproxy_upstream_connections", up)] == 1
    assert after[("doqproxy_upstream_latency_seconds_count", up)] == len(upstream.state.seen)
    inf = ("doqproxy_upstream_latency_seconds_bucket", (("le", "+Inf"), *up))
    assert after[inf] == len(upstream.state.seen)
    assert after[("doqproxy_upstream_latency_seconds_sum", up)] > 0

    # The upstream closes the connection with a DoQ code: counted by name.
    upstream.close_all_connections(code=0x4)
    for _ in range(100):
        closes = await scrape(metrics_port)
        key = ("doqproxy_upstream_connection_closes_total", (("code", "EXCESSIVE_LOAD"), *up))
        if closes.get(key) == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no close counted: {closes}")
    assert proxy.stop() == 0


async def test_metrics_port_in_use_fails(upstream: DoqTestUpstream, tmp_path: Path) -> None:
    with_port = free_port()
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", with_port))
        taken.listen()
        port = free_port()
        args = [
            "forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{upstream.port}",
            "--metrics-listen", f"127.0.0.1:{with_port}",
        ]  # fmt: skip
        proxy = ProxyProcess(args, port, tmp_path / "proxy.log")
        for _ in range(200):
            if proxy.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proxy.stop() == 1
    assert f"cannot listen for metrics on 127.0.0.1:{with_port}" in proxy.stderr_path.read_text()


async def test_query_log(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    log_path = tmp_path / "queries.jsonl"
    proxy = start_proxy(upstream.port, "--query-log", str(log_path), cache=True)
    assert await ask(proxy, "a.test.", "MX") == "0"
    assert await ask(proxy, "missing.test.", tcp=True) == "3"
    assert await ask(proxy, "a.test.", "MX") == "0"  # a cache hit
    assert proxy.stop() == 0
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["transport"], r["qname"], r["qtype"], r["rcode"], r["cache"]) for r in records] == [
        ("udp", "a.test.", "MX", "NOERROR", "miss"),
        ("tcp", "missing.test.", "A", "NXDOMAIN", "miss"),
        ("udp", "a.test.", "MX", "NOERROR", "hit"),
    ]
    name = f"quic://127.0.0.1:{upstream.port}"
    assert [r["upstream"] for r in records] == [name, name, None]
    assert len(upstream.state.seen) == 2
    for record in records:
        assert record["latency_ms"] >= 0
        assert record["time"].endswith("Z")
        host, _, port = record["client"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0


async def test_query_log_is_off_by_default(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    proxy = start_proxy(upstream.port)
    await ask(proxy, "a.test.")
    assert proxy.stop() == 0
    assert "qname" not in proxy.stderr_path.read_text()


async def test_sigusr1_logs_a_summary(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port)
    await ask(proxy, "a.test.")
    await ask(proxy, "a.test.", "AAAA")
    proxy.proc.send_signal(signal.SIGUSR1)
    for _ in range(100):
        if "queries 2" in proxy.stderr():
            break
        await asyncio.sleep(0.05)
    text = proxy.stderr()
    assert "queries 2, SERVFAIL 0" in text, text
    assert "1 handshakes" in text
    assert proxy.proc.poll() is None  # still running
    assert proxy.stop() == 0


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Uid:"))
    return [int(field) for field in line.split()[1:]]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_user_drops_root(
    upstream: DoqTestUpstream, start_proxy: StartProxy, certs: Certs, nobody_python: NobodyPython
) -> None:
    """After binding, the process runs as nobody; it reads the CA file and keeps its
    tickets as that user, so both live where nobody may read and write."""
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="doqproxy-user-"))
    try:
        ca_file, state = _readable_by(shared, certs.ca_file, nobody.pw_uid, nobody.pw_gid)
        metrics_port = free_port()
        proxy = start_proxy(
            upstream.port,
            "--user", "nobody",
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--state-dir", str(state),
            ca_file=str(ca_file),
            python=nobody_python,
        )  # fmt: skip
        await _check_dropped(proxy, nobody.pw_uid, metrics_port)
    finally:
        shutil.rmtree(shared)


def _readable_by(shared: Path, ca: str, uid: int, gid: int) -> tuple[Path, Path]:
    import shutil

    shared.chmod(0o755)
    ca_file = shared / "ca.pem"
    shutil.copy(ca, ca_file)
    ca_file.chmod(0o644)
    state = shared / "state"
    state.mkdir(mode=0o700)
    os.chown(state, uid, gid)
    return ca_file, state


async def _check_dropped(proxy: ProxyProcess, uid: int, metrics_port: int) -> None:
    nobody = uid
    # The listening socket accepts as soon as it is bound, a moment before the switch.
    for _ in range(100):
        if _uids(proxy.proc.pid) == [nobody] * 4:
            break
        await asyncio.sleep(0.05)
    assert _uids(proxy.proc.pid) == [nobody] * 4
    assert await ask(proxy, "a.test.") == "0"
    samples = await scrape(metrics_port)
    assert samples[("doqproxy_resolver_received_total", ())] == 1
    assert proxy.stop() == 0


async def test_user_unknown_is_one_line(upstream: DoqTestUpstream, tmp_path: Path) -> None:
    port = free_port()
    args = [
        "forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{upstream.port}",
        "--user", "no-such-user-here",
    ]  # fmt: skip
    proxy = ProxyProcess(args, port, tmp_path / "proxy.log")
    for _ in range(200):
        if proxy.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert proxy.stop() == 1
    text = proxy.stderr_path.read_text()
    assert text == "Error: --user no-such-user-here: no such user (see /etc/passwd)\n"
