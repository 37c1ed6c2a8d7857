"""``doqproxy top --once`` / ``--json`` against a real forwarder, its one-line errors, and the
promise that the forwarder never imports ``rich``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import pytest

from doqproxy.top import scrape
from doqproxy.top.scrape import ScrapeError
from doqproxy.upstream import engine

from .conftest import ProxyProcess, doqproxy_command, free_port, tcp_accepting
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]

EVENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
"""What ``doqproxy forward`` runs on here by default (uvloop where it is installed)."""

pytestmark = pytest.mark.slow


async def ask(proxy: ProxyProcess, name: str, rdtype: str = "A") -> int:
    query = dns.message.make_query(name, rdtype)
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
    return int(response.rcode())


def wait_for_metrics(port: int) -> None:
    """The metrics endpoint comes up just after the DNS listeners."""
    for _ in range(200):
        if not tcp_accepting(port):
            time.sleep(0.05)
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10):
                return
        except urllib.error.URLError:
            time.sleep(0.05)
    raise AssertionError(f"no metrics endpoint on port {port}")


async def top(
    *args: str, prelude: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``doqproxy top ARGS`` (after ``prelude`` Python code, when given) to completion."""
    argv = doqproxy_command("top", *args)
    if prelude is not None:
        code = f"{prelude}\nimport sys\nfrom doqproxy.cli import main\nmain(sys.argv[1:])"
        argv = [sys.executable, "-c", code, "top", *args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DOQPROXY_")}
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environment, **(env or {})},
    )


async def test_once_and_json_match_the_queries_sent(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    metrics = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics}", cache=True)
    await asyncio.to_thread(wait_for_metrics, metrics)
    for _ in range(4):
        assert await ask(proxy, "a.test.") == dns.rcode.NOERROR  # one miss, three hits
    assert await ask(proxy, "n1.test.") == dns.rcode.NOERROR
    assert await ask(proxy, "nothing.test.") == dns.rcode.NXDOMAIN
    assert await ask(proxy, "reset.test.") == dns.rcode.SERVFAIL  # EDE 23, Network Error

    result = await top("--json", "--metrics", f"127.0.0.1:{metrics}")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["url"] == f"http://127.0.0.1:{metrics}/metrics"
    assert (snap["queries"], snap["cache_hits"], snap["cache_misses"]) == (7, 3, 4)
    assert snap["servfail"] == 1
    assert [(r["code"], r["name"], r["total"]) for r in snap["servfail_reasons"]] == [
        ("23", "Network Error", 1)
    ]
    assert snap["qps"] == 0.0  # nothing was asked between the two scrapes
    assert snap["version"] == "0.1.0" and snap["quic_engine"] == engine.NAME
    assert snap["event_loop"] == EVENT_LOOP
    assert 0 < snap["uptime"] < 600
    [row] = snap["upstreams"]
    assert row["name"] == f"quic://127.0.0.1:{upstream.port}"
    assert (row["connections"], row["handshakes"]) == (1, upstream.state.handshakes)

    # --once without rich installed: plain text, same figures.
    result = await top(
        "--once",
        "--metrics",
        f"127.0.0.1:{metrics}",
        prelude="import sys; sys.modules['rich'] = None",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("doqproxy 0.1.0  up ")
    assert "7 in all" in lines[1]
    assert lines[2] == "last 60s  ▁"  # one step, with no queries in it
    assert "42.9% in all" in lines[3]  # 3 hits of 7 lookups
    assert "23 Network Error: 1" in lines[4]
    assert any(line.startswith(f"quic://127.0.0.1:{upstream.port} ") for line in lines)
    assert proxy.stop() == 0


async def test_rates_while_queries_flow(
    upstream: DoqTestUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOQPROXY_EVENT_LOOP", "asyncio")  # build_info says which loop runs
    metrics = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics}")
    await asyncio.to_thread(wait_for_metrics, metrics)
    run = asyncio.ensure_future(
        top("--json", "--interval", "2", "--metrics", f"127.0.0.1:{metrics}")
    )
    sent = 0
    while not run.done():
        await ask(proxy, f"n{sent % 64}.test.")
        sent += 1
        await asyncio.sleep(0.01)
    result = run.result()
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["event_loop"] == "asyncio"
    assert 0 < snap["queries"] <= sent
    assert snap["qps"] > 0 and snap["qps"] == snap["qps_minute"]
    [row] = snap["upstreams"]
    assert row["qps"] > 0 and row["share"] == 1.0  # --no-cache: every query goes upstream
    assert row["latency_ms"] > 0
    assert proxy.stop() == 0


async def test_unreachable_is_one_line_and_a_failure(tmp_path: Path) -> None:
    port = free_port()
    result = await top("--once", "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"cannot read http://127.0.0.1:{port}/metrics: connection refused" in line
    assert f"--metrics-listen 127.0.0.1:{port}" in line

    # Without --metrics, forward's config file says where to look.
    config = tmp_path / "doqproxy.toml"
    config.write_text(f'upstream = "quic://127.0.0.1:853"\nmetrics-listen = "0.0.0.0:{port}"\n')
    result = await top("--json", "--config", str(config))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"cannot read http://127.0.0.1:{port}/metrics" in line

    # Forward's own variable comes before its file; top's own variable before both.
    other = free_port()
    env = {"DOQPROXY_METRICS_LISTEN": f"[::1]:{other}"}
    result = await top("--once", "--config", str(config), env=env)
    assert f"cannot read http://[::1]:{other}/metrics" in result.stderr
    env["DOQPROXY_TOP_METRICS"] = f"http://127.0.0.1:{port}/metrics"
    result = await top("--once", "--config", str(config), env=env)
    assert f"cannot read http://127.0.0.1:{port}/metrics" in result.stderr


async def test_not_a_doqproxy_endpoint(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    port = free_port()
    server = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            result = await top("--once", "--metrics", f"http://127.0.0.1:{port}/")
            if "connection refused" not in result.stderr:
                break
            await asyncio.sleep(0.05)
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert "Traceback" not in result.stderr
        assert line.startswith(f"Error: http://127.0.0.1:{port}/: not Prometheus text")
        assert "--metrics-listen" not in line
    finally:
        server.terminate()
        server.wait(10)


async def test_without_rich_the_live_view_says_what_to_install() -> None:
    result = await top(prelude="import sys; sys.modules['rich'] = None")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "pip install 'doqproxy[top]'" in line


def test_importing_the_forwarder_does_not_import_rich() -> None:
    code = (
        "import sys, doqproxy.cli, doqproxy.cli.forward, doqproxy.forwarder, doqproxy.ops.metrics\n"
        "doqproxy.cli.main.get_command(None, 'forward')\n"
        "assert 'rich' not in sys.modules, sorted(m for m in sys.modules if 'rich' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_running_forwarder_does_not_import_rich(
    upstream: DoqTestUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every import, on the proxy's stderr
    metrics = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics}", cache=True)
    await asyncio.to_thread(wait_for_metrics, metrics)
    assert await ask(proxy, "a.test.") == dns.rcode.NOERROR
    assert proxy.stop() == 0
    imports = [line for line in proxy.stderr().splitlines() if line.startswith("import time:")]
    assert any(line.endswith("| doqproxy.ops.metrics") for line in imports)
    assert not [line for line in imports if line.split("|")[-1].strip().startswith("rich")]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", "Remote end closed connection without response"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n# TYPE doq", "IncompleteRead"),
    ],
)
def test_a_forwarder_dying_mid_reply_is_a_scrape_error(reply: bytes, error: str) -> None:
    """What a forwarder killed while answering a scrape looks like to ``fetch``."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

        thread = threading.Thread(target=answer_once)
        thread.start()
        try:
            with pytest.raises(ScrapeError, match=error):
                scrape.fetch(f"http://127.0.0.1:{port}/metrics", timeout=10)
        finally:
            thread.join(10)


async def test_a_row_per_upstream_with_state_and_last_error(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    dead = free_port()  # nothing listens there: connections are refused
    metrics = free_port()
    proxy = start_proxy(
        upstream.port,
        "-u", f"quic://127.0.0.1:{dead}",
        "--upstream-strategy", "round-robin",
        "--metrics-listen", f"127.0.0.1:{metrics}",
    )  # fmt: skip
    await asyncio.to_thread(wait_for_metrics, metrics)
    for index in range(10):
        await ask(proxy, f"n{index}.test.")
    run = asyncio.ensure_future(top("--json", "--metrics", f"127.0.0.1:{metrics}"))
    index = 0
    while not run.done():
        await ask(proxy, f"n{index % 64}.test.")
        index += 1
        await asyncio.sleep(0.01)
    result = run.result()
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["upstreams"]}
    live, down = rows[f"quic://127.0.0.1:{upstream.port}"], rows[f"quic://127.0.0.1:{dead}"]
    assert len(rows) == 2
    assert live["state"] == "up" and live["last_error"] is None
    assert live["srtt_ms"] > 0 and live["qps"] > 0 and live["connections"] == 1
    assert down["state"] in ("backoff", "probing")
    assert down["last_error"].startswith("connect"), down
    assert down["failures"]["connect"] >= 1
    assert live["share"] + (down["share"] or 0) == pytest.approx(1.0)
    assert proxy.stop() == 0


async def test_refusals_show_on_the_load_line(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    metrics = free_port()
    proxy = start_proxy(
        upstream.port, "--ratelimit", "1", "--metrics-listen", f"127.0.0.1:{metrics}", cache=True
    )
    await asyncio.to_thread(wait_for_metrics, metrics)
    query = dns.message.make_query("a.test.", "A")
    for _ in range(20):  # well over 1 a second from one client
        with contextlib.suppress(dns.exception.Timeout):
            await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=0.2)
    result = await top("--json", "--metrics", f"127.0.0.1:{metrics}")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert snap["refused"] >= 1 and snap["refused_rate"] == 0.0
    result = await top("--once", "--metrics", f"127.0.0.1:{metrics}")
    assert f"; refused 0.0/s, {snap['refused']} in all" in result.stdout
    assert proxy.stop() == 0
