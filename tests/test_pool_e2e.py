"""The connection pool, 0-RTT and persisted tickets, end to end: a real proxy
process against the aioquic test upstream."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from .conftest import Certs, ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]


async def ask(proxy: ProxyProcess, name: str = "a.test.", wait: float = 10) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=wait)


async def wait_for(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_queries_share_a_connection_then_resume_with_early_data(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    for index in range(10):
        assert (await ask(proxy, f"n{index}.test.")).rcode() == dns.rcode.NOERROR
    assert upstream.state.handshakes == 1
    await wait_for(lambda: bool(upstream.state.tickets))
    upstream.close_all_connections()
    await asyncio.sleep(0.2)
    assert (await ask(proxy, "n20.test.")).answer
    assert upstream.state.handshakes == 2
    assert upstream.state.early_accepted == 1
    assert upstream.state.seen[-1].early, "the query after the reconnect was not early data"


async def test_server_closes_everything_then_50_parallel_queries(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    assert (await ask(proxy)).answer
    upstream.close_all_connections(code=0x2)
    await asyncio.sleep(0.1)
    replies = await asyncio.gather(*(ask(proxy, f"n{i}.test.") for i in range(50)))
    assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies)


async def test_in_flight_queries_survive_a_dying_connection(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 1.0
    proxy = start_proxy(upstream.port)
    assert (await ask(proxy)).answer
    slow = [asyncio.ensure_future(ask(proxy, "slow.test.")) for _ in range(5)]
    await wait_for(lambda: upstream.seen_names().count("slow.test.") == 5)
    upstream.close_all_connections()
    replies = await asyncio.gather(*slow)
    assert all(reply.answer for reply in replies), [r.rcode() for r in replies]


async def test_server_restart_down_and_back(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--timeout", "3")
    assert (await ask(proxy)).answer
    # Restart on the same port: the old connection is silently dead.
    await upstream.stop()
    await upstream.start()
    reply = await ask(proxy)
    assert reply.rcode() == dns.rcode.NOERROR, proxy.stderr()
    # Down: SERVFAIL within the timeout.
    await upstream.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await ask(proxy)).rcode() == dns.rcode.SERVFAIL
    assert loop.time() - started < 3 + 1
    # Back: answered without restarting the proxy (after the backoff).
    await upstream.start()
    deadline = loop.time() + 15
    while (reply := await ask(proxy)).rcode() != dns.rcode.NOERROR:
        assert loop.time() < deadline, proxy.stderr()
        await asyncio.sleep(0.25)


async def test_proxy_restart_sends_first_query_as_accepted_early_data(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    state_dir = tmp_path / "persist"
    proxy = start_proxy(upstream.port, "--state-dir", str(state_dir))
    assert (await ask(proxy)).answer
    await wait_for(lambda: (state_dir / "tickets.json").exists())
    assert proxy.stop() == 0
    handshakes = upstream.state.handshakes
    proxy = start_proxy(upstream.port, "--state-dir", str(state_dir))
    assert (await ask(proxy, "n1.test.")).answer
    assert upstream.state.handshakes == handshakes + 1
    assert upstream.state.early_accepted == 1
    first = upstream.state.seen[-1]
    assert first.early, "stream data did not arrive before the handshake completed"


async def test_ticket_file_is_private_json(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    state_dir = tmp_path / "persist"
    proxy = start_proxy(upstream.port, "--state-dir", str(state_dir))
    assert (await ask(proxy)).answer
    path = state_dir / "tickets.json"
    await wait_for(path.exists)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80")  # a pickle stream starts with PROTO
    data = json.loads(raw)
    (entries,) = data["tickets"].values()
    assert entries and "resumption_secret" in entries[0]
    assert entries[0]["not_valid_after"].endswith("+00:00")


@pytest.mark.parametrize("damage", ["corrupt", "directory", "foreign-owner", "world-readable"])
async def test_bad_ticket_file_warns_and_works(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path, damage: str
) -> None:
    state_dir = tmp_path / "persist"
    state_dir.mkdir()
    path = state_dir / "tickets.json"
    if damage == "corrupt":
        path.write_bytes(b'{"version": 1, "tickets": {"x": [{"age_add": ')
        path.chmod(0o600)
    elif damage == "directory":
        path.mkdir()
    elif damage == "foreign-owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to chown")
        path.write_text('{"version": 1, "tickets": {}}')
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
    else:
        path.write_text('{"version": 1, "tickets": {}}')
        path.chmod(0o644)
    proxy = start_proxy(upstream.port, "--state-dir", str(state_dir))
    assert (await ask(proxy)).rcode() == dns.rcode.NOERROR
    assert "ignoring" in proxy.stderr() and "tickets.json" in proxy.stderr()
    assert proxy.stop() == 0


async def test_retry_server_with_early_data(certs: Certs, start_proxy: StartProxy) -> None:
    server = DoqTestUpstream(certs.cert_file, certs.key_file, retry=True)
    await server.start()
    try:
        proxy = start_proxy(server.port, "--timeout", "4")
        assert (await ask(proxy)).answer
        await wait_for(lambda: bool(server.state.tickets))
        server.close_all_connections()
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await ask(proxy, "n2.test.")
        assert reply.rcode() == dns.rcode.NOERROR, proxy.stderr()
        assert loop.time() - started < 2, "the early query was lost after Retry"
    finally:
        await server.stop()


async def test_server_that_forgot_its_tickets(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    assert (await ask(proxy)).answer
    await wait_for(lambda: bool(upstream.state.tickets))
    upstream.forget_tickets()
    upstream.close_all_connections()
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await ask(proxy, "n3.test.")).answer
    assert loop.time() - started < 1.5
    assert upstream.state.early_accepted == 0


async def test_stream_limit_5_with_200_concurrent_queries(
    certs: Certs, start_proxy: StartProxy
) -> None:
    server = DoqTestUpstream(certs.cert_file, certs.key_file, max_streams=5)
    await server.start()
    try:
        proxy = start_proxy(server.port, "--timeout", "20")
        replies = await asyncio.gather(*(ask(proxy, f"n{i % 64}.test.", 30) for i in range(200)))
        assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies)
        assert len(server.state.seen) == 200
    finally:
        await server.stop()


async def test_no_0rtt_flag(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, "--no-0rtt")
    assert (await ask(proxy)).answer
    await wait_for(lambda: bool(upstream.state.tickets))
    upstream.close_all_connections()
    await asyncio.sleep(0.2)
    assert (await ask(proxy, "n4.test.")).answer
    assert upstream.state.handshakes == 2
    assert not any(seen.early for seen in upstream.state.seen)


async def test_full_pool_queues_then_refuses_at_once(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 1.5
    proxy = start_proxy(
        upstream.port,
        "--max-connections-per-upstream", "1",
        "--max-streams-per-connection", "2",
        "--max-queued-queries", "3",
    )  # fmt: skip
    assert (await ask(proxy)).answer  # the connection is up
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def timed() -> tuple[int, float]:
        reply = await ask(proxy, "slow.test.")
        return reply.rcode(), loop.time() - started

    results = await asyncio.gather(*(timed() for _ in range(8)))
    codes = [code for code, _ in results]
    # 2 in flight + 3 queued are answered; the other 3 get SERVFAIL at once.
    assert codes.count(dns.rcode.NOERROR) == 5, codes
    assert codes.count(dns.rcode.SERVFAIL) == 3, codes
    assert all(elapsed < 1.0 for code, elapsed in results if code == dns.rcode.SERVFAIL)


async def test_idle_connection_is_closed_cleanly(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--upstream-idle-timeout", "3")
    assert (await ask(proxy)).answer
    await wait_for(lambda: upstream.state.close_codes == [0], limit=10)
    assert (await ask(proxy, "n1.test.")).answer  # a new connection, resumed
    assert upstream.state.handshakes == 2


async def test_keepalive_keeps_the_connection(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--upstream-idle-timeout", "3", "--keepalive", "1")
    assert (await ask(proxy)).answer
    await asyncio.sleep(4.5)
    assert upstream.state.close_codes == []
    assert (await ask(proxy, "n1.test.")).answer
    assert upstream.state.handshakes == 1


async def test_connection_reaching_its_maximum_age(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--max-connection-age", "1")
    assert (await ask(proxy)).answer
    await asyncio.sleep(1.5)
    assert (await ask(proxy, "n1.test.")).answer
    assert upstream.state.handshakes == 2
    await wait_for(lambda: 0 in upstream.state.close_codes, limit=10)
