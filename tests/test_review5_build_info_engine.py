"""Review: /metrics' build_info names the QUIC engine that runs. It was fixed at
start-up, so a SIGHUP that switched quic-engine left it naming the old one. The
engine is selected (a process-wide setting) while a reload reads the options, so a
reload that is refused after that (an error in a later option) must put it back."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from doqproxy.upstream import engine

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream

pytestmark = pytest.mark.skipif("qh3" not in engine.installed(), reason="qh3 is not installed")


def _build_info(port: int) -> str:
    for _ in range(100):  # the metrics server starts after the listeners
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            break
        except urllib.error.URLError:
            time.sleep(0.1)
    else:
        raise AssertionError("no /metrics")
    [line] = [line for line in text.splitlines() if line.startswith("doqproxy_build_info{")]
    return line


async def _reload(proxy: ProxyProcess, outcome: str) -> None:
    proxy.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if outcome in proxy.stderr():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {outcome!r}:\n{proxy.stderr()}")


async def test_build_info_follows_the_engine_a_reload_selects(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOQPROXY_QUIC_ENGINE", raising=False)
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file)
    await upstream.start()
    port, metrics = free_port(), free_port()
    config = tmp_path / "doqproxy.toml"
    base = (
        f'listen = ["127.0.0.1:{port}"]\nmetrics-listen = "127.0.0.1:{metrics}"\n'
        f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'upstream = "quic://127.0.0.1:{upstream.port}"\nstate-dir = "{tmp_path / "state"}"\n'
    )
    config.write_text(base + 'quic-engine = "qh3"\n')
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert 'quic_engine="qh3"' in await asyncio.to_thread(_build_info, metrics)
        config.write_text(
            base + 'quic-engine = "aioquic"\ncache-min-ttl = 600\ncache-max-ttl = 60\n'
        )
        await _reload(proxy, "reload failed")  # refused: qh3 still runs
        assert 'quic_engine="qh3"' in await asyncio.to_thread(_build_info, metrics)
        config.write_text(base + 'quic-engine = "aioquic"\n')
        await _reload(proxy, "reload: done")
        assert 'quic_engine="aioquic"' in await asyncio.to_thread(_build_info, metrics)
    finally:
        proxy.stop()
        await upstream.stop()
