"""Routes from the TOML file: check-config shows them, SIGHUP reloads them, the cache
entries of a changed route are dropped and the rest are kept, a bad file changes
nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import dns.asyncquery
import dns.message
from click.testing import CliRunner

from doqproxy.cli import main

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .serve_helpers import PlainDnsServer, rdatas


async def _ask(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=15)


async def _wait_for_log(proxy: ProxyProcess, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proxy.stderr().count(text) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{proxy.stderr()}")


def _config(path: Path, certs: Certs, listen: int, upstream: int, plain: int) -> None:
    path.write_text(
        f'listen = ["127.0.0.1:{listen}"]\n'
        f'upstream = "quic://127.0.0.1:{upstream}"\n'
        f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'state-dir = "{path.parent}/state"\n'
        "[[route]]\n"
        'domains = ["plain.test", "lan"]\n'
        f'upstreams = ["udp://127.0.0.1:{plain}"]\n'
        "[[route]]\n"
        'domains = ["eu.plain.test"]\n'
        f'upstreams = ["quic://127.0.0.1:{upstream}"]\n'
    )


def test_check_config_shows_routes(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "c.toml"
    _config(path, certs, 5399, 853, 5300)
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    expected = (
        'route = ["plain.test.,lan.=udp://127.0.0.1:5300", "eu.plain.test.=quic://127.0.0.1:853"]'
    )
    assert f"{expected}  # config file" in result.output
    assert "no-local-zones = false  # default" in result.output
    path.write_text(path.read_text() + "[[route]]\ndomains = []\nupstreams = ['udp://1.1.1.1']\n")
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code != 0
    assert "domains must be a non-empty list" in result.output


async def test_sighup_reloads_routes_and_drops_their_cache_entries(
    tmp_path: Path, certs: Certs, upstream: DoqTestUpstream
) -> None:
    first, second = PlainDnsServer(), PlainDnsServer()
    await first.start()
    await second.start()
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    _config(config, certs, port, upstream.port, first.port)
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert rdatas(await _ask(port, "host.plain.test")) == ["198.51.100.7"]
        assert rdatas(await _ask(port, "a.test")) == ["192.0.2.1"]
        assert len(first.state.seen) == 1 and len(upstream.state.seen) == 1
        await _ask(port, "x.eu.plain.test")  # the DoQ route's own pool connects
        assert len(upstream.state.seen) == 2
        handshakes = upstream.state.handshakes

        config.write_text(config.read_text().replace("[[route]]", "[[route]]\nbogus = 1"))
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload failed, keeping the old configuration")
        assert rdatas(await _ask(port, "host.plain.test")) == ["198.51.100.7"]  # cached
        assert len(first.state.seen) == 1

        _config(config, certs, port, upstream.port, second.port)
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload: done")
        assert "routes changed for lan., plain.test." in proxy.stderr()
        assert rdatas(await _ask(port, "host.plain.test")) == ["198.51.100.7"]
        assert len(second.state.seen) == 1 and len(first.state.seen) == 1
        # The default route did not change: its entry is still cached.
        assert rdatas(await _ask(port, "a.test")) == ["192.0.2.1"]
        assert len(upstream.state.seen) == 2
        # The unchanged DoQ route kept its connection: no new handshake.
        await _ask(port, "y.eu.plain.test")
        assert upstream.seen_names()[-1] == "y.eu.plain.test."
        assert upstream.state.handshakes == handshakes
        assert proxy.stop() == 0
    finally:
        proxy.stop()
        await first.stop()
        await second.stop()


async def test_turning_local_zones_on_by_reload_drops_cached_forwarded_answers(
    tmp_path: Path, certs: Certs, upstream: DoqTestUpstream
) -> None:
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    base = (
        f'listen = ["127.0.0.1:{port}"]\nupstream = "quic://127.0.0.1:{upstream.port}"\n'
        f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'state-dir = "{tmp_path}/state"\n'
    )
    config.write_text(base + "no-local-zones = true\n")
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        await _ask(port, "printer.local")  # forwarded (NXDOMAIN from the fixture), cached
        await _ask(port, "printer.local")
        assert upstream.seen_names() == ["printer.local."]
        config.write_text(base)
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload: done")
        assert "local zones turned on; 1 cached entries dropped" in proxy.stderr()
        reply = await _ask(port, "printer.local")
        assert reply.authority[0].to_text().startswith("local. 10800 IN SOA localhost.")
        assert upstream.seen_names() == ["printer.local."]
    finally:
        proxy.stop()
