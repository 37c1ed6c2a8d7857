"""Several upstreams end to end: a real proxy process, three aioquic DoQ upstreams, each
behind a user-space delay relay (5, 40 and 60 ms RTT) that can black-hole its traffic.

Which upstream answered each query is read from the proxy's query log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest

from bench.relay import Relay

from .conftest import SERVER_NAME, Certs, ProxyProcess, doqproxy_command, free_port
from .doq_fixture import DoqTestUpstream
from .test_operations import scrape

RTTS_MS = (5.0, 40.0, 60.0)  # 5 and 40 far apart: a loaded machine adds ms of its own


@dataclass
class Path3:
    """One upstream: the server and the relay in front of it."""

    server: DoqTestUpstream
    relay: Relay
    port: int
    """The relay's port: what the proxy is told."""

    @property
    def url(self) -> str:
        return f"quic://127.0.0.1:{self.port}"

    def blackhole(self, on: bool = True) -> None:
        self.relay.blackhole = on


@dataclass
class Rig:
    paths: list[Path3]
    tmp: Path
    certs: Certs
    proxies: list[ProxyProcess] = field(default_factory=list)

    def start(self, *extra: str, order: tuple[int, ...] = (0, 1, 2), state: str = "state") -> Proxy:
        port = free_port()
        log = self.tmp / f"queries-{port}.jsonl"
        args = ["forward", "-l", f"127.0.0.1:{port}"]
        for index in order:
            args += ["-u", self.paths[index].url]
        args += [
            "--tls-ca-file", self.certs.ca_file,
            "--tls-server-name", SERVER_NAME,
            "--state-dir", str(self.tmp / state),
            "--no-cache",
            "--query-log", str(log),
            *extra,
        ]  # fmt: skip
        proxy = Proxy(args, port, self.tmp / f"proxy-{port}.log")
        proxy.query_log = log
        self.proxies.append(proxy)
        proxy.wait_ready()
        return proxy


class Proxy(ProxyProcess):
    query_log: Path

    def answered_by(self) -> dict[str, str]:
        """qname → the upstream URL that answered, from the query log so far."""
        out: dict[str, str] = {}
        if not self.query_log.exists():
            return out
        for line in self.query_log.read_text().splitlines():
            record = json.loads(line)
            out[record["qname"]] = record["upstream"]
        return out


@pytest.fixture
async def rig(certs: Certs, tmp_path: Path) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    paths: list[Path3] = []
    transports: list[asyncio.DatagramTransport] = []
    for rtt in RTTS_MS:
        server = DoqTestUpstream(certs.cert_file, certs.key_file)
        await server.start()
        relay = Relay(("127.0.0.1", server.port), rtt / 2000)
        transport, _ = await loop.create_datagram_endpoint(
            lambda relay=relay: relay,  # type: ignore[misc]
            local_addr=("127.0.0.1", 0),
        )
        transports.append(transport)
        paths.append(Path3(server, relay, transport.get_extra_info("sockname")[1]))
    rig = Rig(paths, tmp_path, certs)
    yield rig
    for proxy in rig.proxies:
        proxy.stop()
    for path in paths:
        for future in path.relay.clients.values():
            if future.done() and future.result().transport is not None:
                cast(asyncio.DatagramTransport, future.result().transport).close()
        await path.server.stop()
    for transport in transports:
        transport.close()


async def ask(port: int, name: str, wait: float = 10.0) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=wait)


async def wait_for(predicate: Callable[[], bool], limit: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"not reached: {what}"
        await asyncio.sleep(0.05)


async def run(proxy: Proxy, prefix: str, count: int, pace: float = 0.03) -> list[tuple[str, Any]]:
    """``count`` paced queries for unique names; (name, rcode, seconds) each."""
    results = []
    for i in range(count):
        name = f"{prefix}{i}.test."
        started = time.monotonic()
        reply = await ask(proxy.port, name)
        results.append((name, (reply.rcode(), time.monotonic() - started)))
        await asyncio.sleep(pace)
    return results


async def sources(proxy: Proxy, names: list[str]) -> list[str]:
    """The upstream that answered each name (waits for the query log to be written)."""
    await wait_for(lambda: all(n in proxy.answered_by() for n in names), what="query log")
    seen = proxy.answered_by()
    return [seen[n] for n in names]


async def test_fastest_settles_moves_on_blackhole_and_comes_back(rig: Rig) -> None:
    fast, middle, slow = rig.paths
    proxy = rig.start("--timeout", "5")
    # Settle: after the first few seconds every answer comes from the 5 ms upstream.
    await run(proxy, "warm", 40)
    settled = await run(proxy, "settled", 20)
    names = [name for name, _ in settled]
    assert set(await sources(proxy, names)) == {fast.url}, proxy.stderr()
    # Black-hole it: no SERVFAIL, no query anywhere near the timeout, traffic moves.
    fast.blackhole()
    during = await run(proxy, "during", 60)
    assert all(rcode == dns.rcode.NXDOMAIN for _, (rcode, _) in during), during
    assert max(seconds for _, (_, seconds) in during) < 2.0, during
    answered = await sources(proxy, [name for name, _ in during])
    assert answered[-20:] == [middle.url] * 20, answered
    # Back: traffic returns once a probe gets through (backoff is at most a few seconds).
    fast.blackhole(False)
    deadline = time.monotonic() + 40
    batch = 0
    while True:
        after = await run(proxy, f"after{batch}x", 10)
        got = await sources(proxy, [name for name, _ in after])
        assert all(rcode == dns.rcode.NXDOMAIN for _, (rcode, _) in after)
        if got[-5:] == [fast.url] * 5:
            break
        assert time.monotonic() < deadline, (got, proxy.stderr())
        batch += 1
    assert slow.url not in got


async def test_parallel_answers_come_from_the_faster_and_the_slower_is_cancelled(
    rig: Rig,
) -> None:
    fast, _, slow = rig.paths
    slow.server.state.answer_delay = 0.3  # still busy when the cancellation arrives
    proxy = rig.start("--upstream-strategy", "parallel", order=(2, 0))
    await run(proxy, "warm", 3)  # the very first may be cancelled before the handshake
    results = await run(proxy, "par", 10, pace=0.05)
    names = [name for name, _ in results]
    assert await sources(proxy, names) == [fast.url] * 10
    seen_by_slow = slow.server.seen_names()
    assert set(names) <= set(seen_by_slow), "parallel did not send to both"
    await wait_for(
        lambda: slow.server.state.cancelled.count(("stop", 0x3)) >= 10,
        what=f"STOP_SENDING 0x3 at the slow server: {slow.server.state.cancelled}",
    )
    assert all(code == 0x3 for _, code in slow.server.state.cancelled)


async def test_failover_follows_the_order_given(rig: Rig) -> None:
    fast, middle, slow = rig.paths
    proxy = rig.start("--upstream-strategy", "failover", order=(1, 2, 0))
    first = await run(proxy, "fo", 10)
    assert await sources(proxy, [n for n, _ in first]) == [middle.url] * 10
    middle.blackhole()
    second = await run(proxy, "fb", 15)
    assert all(rcode == dns.rcode.NXDOMAIN for _, (rcode, _) in second)
    answered = await sources(proxy, [n for n, _ in second])
    assert answered[-10:] == [slow.url] * 10, answered  # the next in order, not the fastest
    assert fast.url not in answered


async def test_all_down_is_servfail_with_ede_22_naming_each(rig: Rig) -> None:
    metrics_port = free_port()
    proxy = rig.start("--timeout", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}")
    assert (await ask(proxy.port, "a.test.")).rcode() == dns.rcode.NOERROR
    await run(proxy, "up", 5)
    before = await scrape(metrics_port)
    fast = (("upstream", rig.paths[0].url),)
    answers = before[("doqproxy_upstream_answers_total", fast)]
    assert answers >= 3
    assert before[("doqproxy_upstream_queries_sent_total", fast)] >= answers
    assert before[("doqproxy_upstream_state", (("state", "up"), *fast))] == 1
    assert before[("doqproxy_upstream_state", (("state", "backoff"), *fast))] == 0
    assert 0 < before[("doqproxy_upstream_srtt_seconds", fast)] < 1
    assert ("doqproxy_upstream_queued_queries", fast) in before
    for path in rig.paths:
        path.blackhole()
    started = time.monotonic()
    reply = await ask(proxy.port, "down.test.")
    elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert elapsed < 2 + 1.0
    (ede,) = [o for o in reply.options if o.otype == dns.edns.EDE]
    ede = cast(dns.edns.EDEOption, ede)
    assert ede.code == 22, (ede.text, proxy.stderr()[-3000:])
    text = ede.text or ""
    for path in rig.paths:
        assert f"127.0.0.1:{path.port}" in text, text
    assert "all 3 failed" in text
    after = await scrape(metrics_port)
    for path in rig.paths:
        label = (("upstream", path.url),)
        failures = ("doqproxy_upstream_failures_total", (("reason", "timeout"), *label))
        assert after[failures] >= 1, path.url
        assert after[("doqproxy_upstream_state", (("state", "backoff"), *label))] == 1
        errors = [
            k for k in after if k[0] == "doqproxy_upstream_last_error_info" and label[0] in k[1]
        ]
        assert errors and "no answer within" in dict(errors[0][1])["error"]
    assert sum(v for k, v in after.items() if k[0] == "doqproxy_upstream_hedged_total") >= 2


async def test_restart_first_query_goes_to_the_fastest_as_0rtt(rig: Rig) -> None:
    fast = rig.paths[0]
    # The fastest given last, so the order alone would not pick it.
    proxy = rig.start(order=(2, 1, 0))
    await run(proxy, "learn", 40)
    state = rig.tmp / "state"
    await wait_for(lambda: (state / "tickets.json").exists())
    assert proxy.stop() == 0
    saved = json.loads((state / "upstreams.json").read_text())["upstreams"]
    assert stat.S_IMODE((state / "upstreams.json").stat().st_mode) == 0o600
    srtts = {p.url: saved[p.url]["srtt"] for p in rig.paths}
    assert min(srtts, key=lambda u: srtts[u]) == fast.url
    tickets = json.loads((state / "tickets.json").read_text())["tickets"]
    assert len(tickets) == 3, "each upstream keeps its own tickets in the one file"
    early_before = [p.server.state.early_accepted for p in rig.paths]
    proxy = rig.start(order=(2, 1, 0))
    reply = await ask(proxy.port, "first.test.")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert await sources(proxy, ["first.test."]) == [fast.url]
    first = [
        s for s in fast.server.state.seen if s.message.question[0].name.to_text() == "first.test."
    ]
    assert first and first[0].early, "the first query after the restart was not 0-RTT"
    # The answer to early data can arrive before the handshake ends on the server's side.
    await wait_for(
        lambda: fast.server.state.early_accepted == early_before[0] + 1, what="0-RTT accepted"
    )
    # The others were asked on the side (exploration), each as 0-RTT on its first connection.
    await wait_for(
        lambda: all(
            p.server.state.early_accepted == before + 1
            for p, before in zip(rig.paths, early_before, strict=True)
        ),
        what="0-RTT to every upstream",
    )


async def test_sighup_keeps_the_pools_of_unchanged_upstreams(rig: Rig) -> None:
    a, b, c = rig.paths
    config = rig.tmp / "doqproxy.toml"

    def write(*paths: Path3, extra: str = "") -> None:
        tables = "".join(f'[[upstream]]\nurl = "{p.url}"\n' for p in paths)
        config.write_text(f'upstream-strategy = "parallel"\n{extra}{tables}')

    write(a, b)
    port = free_port()
    args = [
        "forward", "--config", str(config), "-l", f"127.0.0.1:{port}",
        "--tls-ca-file", rig.certs.ca_file, "--tls-server-name", SERVER_NAME,
        "--state-dir", str(rig.tmp / "state"), "--no-cache", "--timeout", "2",
    ]  # fmt: skip
    proxy = Proxy(args, port, rig.tmp / "proxy-hup.log")
    rig.proxies.append(proxy)
    proxy.wait_ready()
    await run(proxy, "one", 5)
    assert a.server.state.handshakes == 1 and b.server.state.handshakes == 1
    # A bad file changes nothing.
    write(a, a)
    os.kill(proxy.proc.pid, signal.SIGHUP)
    await wait_for(lambda: "reload failed" in proxy.stderr(), what="reload failed")
    assert "given twice" in proxy.stderr()
    # B out, C in: A keeps its connection, C gets one, B is closed cleanly.
    write(a, c)
    os.kill(proxy.proc.pid, signal.SIGHUP)
    await wait_for(lambda: "reload: done" in proxy.stderr(), what="reload done")
    await run(proxy, "new", 3)  # C's first may be cancelled before its handshake ends
    results = await run(proxy, "two", 5)
    assert all(rcode == dns.rcode.NXDOMAIN for _, (rcode, _) in results)
    assert a.server.state.handshakes == 1, "the unchanged upstream's pool was rebuilt"
    assert c.server.state.handshakes == 1
    # A answers first; C's copy of each query reaches C half C's RTT after it left.
    await wait_for(
        lambda: {n for n, _ in results} <= set(c.server.seen_names()),
        what=f"every query also at C: {c.server.seen_names()}",
    )
    await wait_for(lambda: 0 in b.server.state.close_codes, what="B closed with NO_ERROR")
    assert not {n for n, _ in results} & set(b.server.seen_names())


async def test_bad_state_file_is_a_warning_not_a_failed_start(rig: Rig) -> None:
    state = rig.tmp / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / "upstreams.json")
    proxy = rig.start()
    assert (await ask(proxy.port, "a.test.")).rcode() == dns.rcode.NOERROR
    assert "upstreams.json" in proxy.stderr() and "Traceback" not in proxy.stderr()
    assert proxy.stop() == 0
    (state / "upstreams.json").unlink()
    (state / "upstreams.json").symlink_to(rig.tmp / "elsewhere.json")
    proxy = rig.start()
    assert (await ask(proxy.port, "a.test.")).rcode() == dns.rcode.NOERROR
    assert proxy.stop() == 0
    assert "upstreams.json" in proxy.stderr() and "Traceback" not in proxy.stderr()
    assert not (rig.tmp / "elsewhere.json").exists(), "wrote through the symlink"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-u", "quic://192.0.2.1", "-u", "quic://192.0.2.1:853"], "is given twice"),
        (["-u", "quic://192.0.2.1", "--upstream-strategy", "fast"], "'fast' is not one of"),
        (["-u", "quic://192.0.2.1?tls-pin=x"], "unknown option 'tls-pin'"),
        (["-u", "quic://192.0.2.1?tls-ca-file=/no/such.pem"], "/no/such.pem: no such file"),
        (
            ["-u", "quic://192.0.2.1", "--hedge-delay-min", "0.6", "--hedge-delay-max", "0.5"],
            "--hedge-delay-min 0.6 is more than --hedge-delay-max 0.5",
        ),
        (["-u", "quic://192.0.2.1", "--parallel-upstreams", "1"], "1 is not in the range"),
    ],
)
def test_bad_upstream_options_are_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        doqproxy_command("forward", "-l", "127.0.0.1:0", *args),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_shows_upstreams_and_strategy(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'upstream-strategy = "parallel"\nhedge-delay-max = 0.3\n'
        '[[upstream]]\nurl = "quic://192.0.2.1"\n'
        '[[upstream]]\nurl = "quic://192.0.2.2:8853"\ntls-server-name = "dns.example"\n'
    )
    env = dict(os.environ, DOQPROXY_PARALLEL_UPSTREAMS="3")
    done = subprocess.run(
        doqproxy_command("check-config", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert (
        'upstream = ["quic://192.0.2.1", "quic://192.0.2.2:8853?tls-server-name=dns.example"]'
        "  # config file"
    ) in lines
    assert 'upstream-strategy = "parallel"  # config file' in lines
    assert "parallel-upstreams = 3  # DOQPROXY_PARALLEL_UPSTREAMS" in lines
    assert "hedge-delay-max = 0.3  # config file" in lines
    assert "hedge-delay-min = 0.05  # default" in lines
    assert "no-hedging = false  # default" in lines
